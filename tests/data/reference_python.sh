#!/usr/bin/env bash
# The reference venv's python (docs/benchmarks.md, "The reference environment") on a machine with no torchvision
# for its torch (the registries' torch 2.13.0+cpu has none): tests/data/reference_env.py's
# stand-in, and OpenFlamingo's factory given open_clip's model without its image transforms
# (as tests/data/openflamingo/make_fixture.py does). Runs a script with its arguments:
#   REF_PY=tests/data/reference_python.sh JAX_PY=.venv/bin/python \
#     bash benchmarks/openflamingo_ab/run_ab.sh ab.jsonl 3 small
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${REF_VENV:-$HOME/.cache/flamingo-refvenv}/bin/python" -c "
import runpy, sys
sys.path.insert(0, '$HERE')
import reference_env
reference_env.allow_missing_torchvision()
import open_clip
from open_flamingo.src import factory
factory.open_clip.create_model_and_transforms = (
    lambda name, pretrained=None, **kw: (open_clip.create_model(name, pretrained=pretrained),
                                         None, None))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
" "$@"
