"""Driver for test_inference.py's multi-process check: greedy, beam and scores of the tiny
model on a data 2 x model 2 mesh, from one process (4 devices) or several (gloo).

  python tests/generate_processes.py OUT.json [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if len(sys.argv) > 2:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(sys.argv[2], num_processes=int(sys.argv[3]),
                             process_id=int(sys.argv[4]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flamingo_jax import config_base, inference, models  # noqa: E402
from flamingo_jax.training import sharding  # noqa: E402
from model_helpers import random_media, set_gates  # noqa: E402


def main(out: str) -> None:
  cfg = config_base.load_config(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "experiments", "configs", "tiny.py")).model
  media = np.asarray(random_media(0, (3, 3, 1, cfg.image_size, cfg.image_size, 3)))
  rs = np.random.RandomState(1)
  words = lambda n: list(map(int, rs.randint(6, cfg.vocab_size, n)))
  image = cfg.image_token_id
  prompts = [[2, image] + words(5) + [image] + words(3), words(4) + [image] + words(9), words(3)]
  model = models.make_flamingo(cfg)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                 jnp.asarray(media[:1]))
    params = jax.device_get(set_gates(params, 0.7))
  mesh = sharding.make_mesh(2, 2)
  specs = sharding.named(mesh, sharding.param_specs(params, sharding.rules_for(cfg, 2)))
  params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                        params, specs)
  engine = inference.Engine(cfg, params, max_slots=64, mesh=mesh)
  greedy = inference.generate(engine, prompts, media, max_new_tokens=8)
  beam = inference.generate(engine, prompts, media, max_new_tokens=8, method="beam",
                            beam_width=3)
  scores = inference.score(engine, prompts, media, [[[7, 8]], [[9]], [[10, 11, 12]]], batch=4)
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"greedy": [r[0].tokens for r in greedy], "beam": [r[0].tokens for r in beam],
                 "beam_log_prob": [r[0].log_prob for r in beam],
                 "scores": [[s[0] for s in row] for row in scores]}, f)


if __name__ == "__main__":
  main(sys.argv[1])
