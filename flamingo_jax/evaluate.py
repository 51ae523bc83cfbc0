r"""Few-shot evaluation (docs/paper.md §6; docs/design.md §7).

  python -m flamingo_jax.evaluate (--workdir=RUN | --params=DIR) [--config=FILE] --task=NAME \
      --data_dir=DIR --shots=0,4,32 [--rices] [--ensemble=6] [--limit=N] [--seed=S] \
      --output=OUT [--mesh=data=D,model=M]

Tasks (evaluation/tasks.py, each reading its official files under --data_dir): coco,
flickr30k, vqav2, okvqa, textvqa, vizwiz, hateful_memes, imagenet, msvd_qa, msrvtt_qa, vatex,
youcook2, naming. `--list_tasks` prints them with their metric.

OUT/results.json: a list of {task, shots, metric, value, queries, skipped, complete,
settings}; OUT/results.md: the same as a markdown table (also printed); OUT/predictions.jsonl:
per (shots, query) the prompt, the output and the reference. Re-running with the same OUT
evaluates only the queries it does not hold yet (an interrupted run resumes; adding a shot
count evaluates just that one); OUT/settings.json pins everything else, and a re-run with
other settings is an error (use another OUT). RICES support/query features are cached in OUT.

--mesh shards the parameters (training's partition rules) and splits each batch's rows over
'data'; with --coordinator_address/--num_processes/--process_id every process runs the same
command (OUT on a filesystem they share; process 0 writes). The numbers do not depend on the
mesh or the number of processes: each query's prompt comes from (seed, query) alone.
"""

import dataclasses
import json
import math
import os
import sys

from absl import flags
from absl import logging
import jax

from flamingo_jax import cli
from flamingo_jax import inference
from flamingo_jax import weights
from flamingo_jax.data import pipeline
from flamingo_jax.evaluation import harness as harness_lib
from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation import tasks
from flamingo_jax.training import param_sources

# --list_tasks needs no config: main checks it.
_CONFIG = cli.define_config(run_flags=("workdir", "params"), required=False)
_WORKDIR = cli.define_workdir("A training run's workdir (its config is the default).")
_PARAMS = cli.define_params()
_TASK = flags.DEFINE_string("task", "", "Task name (--list_tasks).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "The task's official files.")
_SHOTS = flags.DEFINE_list("shots", ["0", "4", "8", "16", "32"], "Shot counts.")
_RICES = flags.DEFINE_bool("rices", False, "Shots by similarity of frozen vision features "
                           "(most similar last) instead of at random.")
_ENSEMBLE = flags.DEFINE_integer("ensemble", 1, "Close-ended tasks: average candidate "
                                 "log-likelihoods over this many orders of the shots.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Queries: a fixed random subset of this many "
                              "(0: all).")
_SUPPORT_SIZE = flags.DEFINE_integer("support_size", 2048, "Support examples the shots come "
                                     "from (a fixed random subset; 0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random shots and the ensemble orders.")
_BEAM = flags.DEFINE_integer("beam", 3, "Open-ended tasks: beam width (1: greedy).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "Open-ended tasks: new tokens at most.")
_FRAMES = flags.DEFINE_integer("frames", 30, "Video tasks: frames per clip (evenly spaced).")
_LENGTH_NORMALIZE = flags.DEFINE_bool("length_normalize", False, "Close-ended tasks: rank "
                                      "by log-likelihood per token instead of in total.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Queries per batch.")
_OUTPUT = flags.DEFINE_string("output", "", "Output directory (results, predictions).")
_LIST_TASKS = flags.DEFINE_bool("list_tasks", False, "Print the tasks and exit.")
_MESH = cli.define_mesh()
cli.define_start()


class UsageError(ValueError):
  """A command line that cannot run; the message says why."""


def _settings():
  return harness_lib.Settings(
      task=_TASK.value, seed=_SEED.value, rices=_RICES.value, ensemble=_ENSEMBLE.value,
      limit=_LIMIT.value, support_size=_SUPPORT_SIZE.value, beam=_BEAM.value,
      max_new_tokens=_MAX_NEW.value, frames=_FRAMES.value,
      length_normalize=_LENGTH_NORMALIZE.value, batch_size=_BATCH_SIZE.value)


def _shot_counts() -> list[int]:
  try:
    counts = sorted({int(s) for s in _SHOTS.value})
  except ValueError:
    raise UsageError(f"--shots={','.join(_SHOTS.value)}: expected integers") from None
  if not counts or counts[0] < 0:
    raise UsageError(f"--shots={','.join(_SHOTS.value)}: expected counts >= 0")
  return counts


def _pin_settings(output: str, settings, source: str, writer: bool) -> None:
  """OUT/settings.json on a first run; on a re-run, the same settings or an error (the batch
  size and the mesh may change: results do not depend on them)."""
  pinned = dict(dataclasses.asdict(settings), params=source)
  del pinned["batch_size"]
  path = os.path.join(output, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = sorted(k for k in set(before) | set(pinned) if before.get(k) != pinned.get(k))
    if changed:
      raise UsageError(f"{output} holds an evaluation with other settings ("
                       + ", ".join(f"{k}: {before.get(k)!r} -> {pinned.get(k)!r}"
                                   for k in changed) + "); use another --output")
  elif writer:
    with open(path + ".tmp", "w") as f:
      json.dump(pinned, f, indent=1)
    os.replace(path + ".tmp", path)


def _write_results(output: str, results: list[dict]) -> str:
  path = os.path.join(output, "results.json")
  by_shots = {}
  if os.path.exists(path):
    with open(path) as f:
      by_shots = {(r["task"], r["shots"]): r for r in json.load(f)}
  for r in results:              # a resumed setting keeps the throughput its queries ran at
    before = by_shots.get((r["task"], r["shots"]), {}).get("settings", {})
    if "queries_per_second" in before and "queries_per_second" not in r["settings"]:
      r["settings"]["queries_per_second"] = before["queries_per_second"]
  by_shots.update({(r["task"], r["shots"]): r for r in results})
  merged = sorted(by_shots.values(), key=lambda r: (r["task"], r["shots"]))
  # JSON has no NaN: a setting whose queries were all skipped has value null.
  serialisable = [dict(r, value=None if math.isnan(r["value"]) else r["value"]) for r in merged]
  with open(path + ".tmp", "w") as f:
    json.dump(serialisable, f, indent=1)
  os.replace(path + ".tmp", path)
  table = harness_lib.markdown_table(merged)
  with open(os.path.join(output, "results.md"), "w") as f:
    f.write(table)
  return table


def main(argv):
  del argv
  cli.start()
  if _LIST_TASKS.value:
    for name in tasks.names():
      task = tasks.get(name)
      print(f"{name:15s} {task.modality:6s} {task.mode:9s} {task.metric}")
    return
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  writer = jax.process_index() == 0
  try:
    if config is None:
      raise UsageError("--config=FILE is required (or --workdir=RUN, or --params=DIR of an "
                       "OpenFlamingo or IDEFICS import)")
    if bool(_WORKDIR.value) == bool(_PARAMS.value):
      raise UsageError("give exactly one of --workdir and --params")
    for flag in (_TASK, _DATA_DIR, _OUTPUT):
      if not flag.value:
        raise UsageError(f"--{flag.name} is required")
    task = tasks.get(_TASK.value)
    if task.metric == "cider":
      metrics.check_ptb_tokenizer()       # Java and the jar, before the model is loaded
    counts = _shot_counts()
    settings = _settings()
    source = os.path.abspath(_WORKDIR.value or _PARAMS.value)
    split = task.load(_DATA_DIR.value)
    tokenizer = pipeline.load_tokenizer(config)
    params, _ = param_sources.load(config, source)
    params, mesh = param_sources.place(config, params, _MESH.value)
    os.makedirs(_OUTPUT.value, exist_ok=True)
    store = harness_lib.Store(os.path.join(_OUTPUT.value, "predictions.jsonl"), writer=writer)
    harness = harness_lib.Harness(
        task, split, settings, tokenizer,
        lambda slots: inference.Engine(config.model, params, max_slots=slots, mesh=mesh),
        store, image_size=config.model.image_size, feature_cache=_OUTPUT.value,
        feature_key=f"{source} {config.model.vision.variant} {config.model.image_size}")
    too_many = [k for k in counts if k > len(harness.support)]
    if too_many:
      raise UsageError(f"{too_many[0]} shots asked for but the support set holds "
                       f"{len(harness.support)} examples")
    _pin_settings(_OUTPUT.value, settings, source, writer)
  except (UsageError, ValueError, FileNotFoundError, weights.CheckpointError,
          metrics.TokenizerUnavailableError) as e:
    sys.exit(f"error: {e}")
  total = sum(len(harness.pending(k)) for k in counts)
  progress = cli.Progress(total, f"evaluate {task.name}", unit="queries",
                          enabled=writer and total > 0)
  results = []
  for shots in counts:
    harness.run(shots, progress.update)
    results.append(harness.result(shots))
  if writer:
    print(_write_results(_OUTPUT.value, results), end="")
    skipped = sum(sum(r["skipped"].values()) for r in results)
    if skipped:
      print(f"skipped: {skipped} (by reason, per shot count, in results.json)", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)            # --config is checked in main: --list_tasks needs none
