"""The input pipeline's state inside a checkpoint: one small JSON file per data shard.

    checkpoints/<step>/input/shard-<d>-of-<D>.json    {stream: {"cursor", "skipped"}}
"""

import dataclasses
import json
import re

from etils import epath
import orbax.checkpoint as ocp


class InputStateHandler(ocp.CheckpointHandler):
  """The input pipeline's state as one JSON file per data shard, `shard-<d>-of-<D>.json`
  ({stream: {"cursor", "skipped"}}). Each process writes the shards it was given (the trainer
  gives each shard to the first process feeding it) and reads the shards it feeds: no
  collective, and a restore with another process count reads the shards it now feeds."""

  _PATTERN = re.compile(r"shard-(\d+)-of-(\d+)\.json$")

  def save(self, directory: epath.Path, args: "InputStateSave") -> None:
    state = args.state
    for shard in args.shards:
      per_stream = {name: shards[str(shard)] for name, shards in state["streams"].items()}
      (directory / f"shard-{shard}-of-{state['num_shards']}.json").write_text(
          json.dumps(per_stream))

  def restore(self, directory: epath.Path, args: "InputStateRestore") -> dict:
    """The pipeline state ({"num_shards", "streams"}) of `args.shards` (None: all stored)."""
    stored = {}
    for path in directory.iterdir():
      match = self._PATTERN.match(path.name)
      if match:
        stored[int(match.group(1))] = (int(match.group(2)), path)
    counts = {count for count, _ in stored.values()}
    if len(counts) != 1:
      raise ValueError(f"{directory} holds input states for {sorted(counts) or 'no'} data "
                       f"shard counts; expected one")
    num_shards = counts.pop()
    wanted = sorted(stored) if args.shards is None else list(args.shards)
    streams = {}
    if num_shards == args.num_shards or args.num_shards is None:
      missing = [d for d in wanted if d not in stored]
      if missing:
        raise ValueError(f"{directory} lacks the input state of data shards {missing}")
      for d in wanted:
        for name, value in json.loads(stored[d][1].read_text()).items():
          streams.setdefault(name, {})[str(d)] = value
    # Another shard count: returned as is, for the pipeline to refuse with its own message.
    return {"num_shards": num_shards, "streams": streams}

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(InputStateHandler, for_save=True)
@dataclasses.dataclass
class InputStateSave(ocp.args.CheckpointArgs):
  state: dict                     # pipeline.InputPipeline.state()
  shards: tuple[int, ...]         # the data shards this process writes


@ocp.args.register_with_handler(InputStateHandler, for_restore=True)
@dataclasses.dataclass
class InputStateRestore(ocp.args.CheckpointArgs):
  shards: tuple[int, ...] | None = None     # None: every stored shard
  num_shards: int | None = None             # this pipeline's
