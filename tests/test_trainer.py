"""The training loop: bit-exact resume after SIGTERM, NaN handling, corrupt checkpoints and
config changes (docs/design.md §7, §9); several processes: test_multiprocess.py."""

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from flamingo_jax.training import checkpointing
from flamingo_jax.training import input_state
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training import trainer
from flamingo_jax.training import workdir as workdir_lib
from train_helpers import losses, poison, small_config, stream_subset_config_file
from train_helpers import train, train_command, train_until_sigterm


@pytest.mark.slow
def test_sigterm_and_resume_log_exactly_the_same_losses(tmp_path):
  """The straight run decodes in threads, the stopped and resumed one in a grain worker
  process: the losses are equal as floats."""
  data = str(tmp_path / "data")
  config = stream_subset_config_file(tmp_path, keep=("m3w", "vtp"))   # two iterator states
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(train_command(straight, data, 40, config=config), devices=1)
  workers = "--config.data.workers=1"
  train_until_sigterm(train_command(resumed, data, 40, workers, config=config), 1, resumed, 15)
  stopped_at = max(losses(resumed))
  assert 15 <= stopped_at < 40, stopped_at
  assert stopped_at in [int(d) for d in os.listdir(os.path.join(resumed, "checkpoints"))]
  train(train_command(resumed, data, 40, workers, config=config), devices=1)
  expected, got = losses(straight), losses(resumed)
  assert sorted(got) == list(range(1, 41))
  assert got == expected                                 # float equality, data order included


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = small_config(tiny_config, tmp_path, steps=8, max_consecutive_nonfinite=3)
  poison(monkeypatch, {3} | set(range(5, 100)))
  with pytest.raises(trainer.NonFiniteError, match=r"3 non-finite steps in a row \(steps 5-7\).*"
                     r"last good checkpoint is step 2 .*moved aside: .*checkpoint-4-diverged"):
    trainer.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert [records[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 1, 1]
  assert [records[s]["finite_loss"] for s in range(1, 7)] == [1, 1, 0, 1, 0, 0]
  assert records[6]["skipped_updates"] == 3
  # Step 3 (skipped) is not saved; step 4's parameters gave NaN next, so it is moved aside
  # (the data caused it here, but a loss alone cannot tell), leaving the good 1 and 2.
  ckpt = checkpointing.Checkpointer(workdir, keep=100)
  assert ckpt.all_steps() == [1, 2]
  assert ckpt.verified_steps() == {1, 2}
  ckpt.close()
  assert [n.split("-2026")[0].rsplit("-", 1)[0] for n in os.listdir(tmp_path / "run" / "moved_aside")] \
      == ["checkpoint-4"]


@pytest.mark.slow
def test_nonfinite_state_is_never_saved(tiny_config, tmp_path, monkeypatch):
  """Parameters turned NaN after step 2 (as a diverging update would): step 2 is not saved."""
  make_setup = tasks.make_train_setup

  def diverging_setup(*args, **kwargs):
    setup = make_setup(*args, **kwargs)

    def step(state, frozen, batches):
      state, metrics = setup.step(state, frozen, batches)
      if int(state.step) == 2:
        state = state._replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
      return state, metrics
    return dataclasses.replace(setup, step=step)

  monkeypatch.setattr(tasks, "make_train_setup", diverging_setup)
  workdir = str(tmp_path / "run")
  config = small_config(tiny_config, tmp_path, steps=8, max_consecutive_nonfinite=2)
  with pytest.raises(trainer.NonFiniteError, match="last good checkpoint is step 1 "):
    trainer.train(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=100)
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_config, tmp_path, caplog):
  config = small_config(tiny_config, tmp_path)
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  state, _ = setup.init(jax.random.key(0))
  workdir = str(tmp_path / "run")
  ckpt = checkpointing.Checkpointer(workdir, keep=5)
  for step in (1, 2):
    data_state = {"num_shards": 1, "streams": {"m3w": {"0": {"cursor": step, "skipped": {}}}}}
    ckpt.save(step, state._replace(step=state.step + step), data_state, (0,), config)
  ckpt.close()
  # Damage every data file of the newest checkpoint's train state.
  damaged = 0
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "2", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
      damaged += 1
  assert damaged
  ckpt = checkpointing.Checkpointer(workdir, keep=5)          # a reader: moves nothing
  with caplog.at_level("WARNING"):
    restored_state, restored_data = ckpt.restore(setup, input_shards=(0,), num_shards=1)
  assert int(restored_state.step) == 1
  assert restored_data["pipeline"]["streams"]["m3w"]["0"]["cursor"] == 1
  assert "checkpoint 2" in caplog.text and "does not load" in caplog.text
  assert ckpt.all_steps() == [1, 2]
  # Nothing loads: an error, not a silent fresh start.
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "1", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  with pytest.raises(RuntimeError, match="none of the checkpoints \\[1, 2\\]"):
    ckpt.restore(setup)
  ckpt.close()


@pytest.mark.slow
def test_input_state_is_one_file_per_data_shard_read_by_the_shards_a_process_feeds(
    tiny_config, tmp_path):
  """Each process writes the shards it owns and reads the ones it feeds: here one process
  writes shards 0 and 2 and another (a second save of the same step's item, as a second
  process would) 1 and 3; a reader of shard 2 gets exactly its state."""
  config = small_config(tiny_config, tmp_path)
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  state, _ = setup.init(jax.random.key(0))
  streams = {"m3w": {str(d): {"cursor": 10 + d, "skipped": {"no_image": d}} for d in range(4)},
             "vtp": {str(d): {"cursor": 20 + d, "skipped": {}} for d in range(4)}}
  pipeline_state = {"num_shards": 4, "streams": streams}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), keep=5, async_save=False)
  ckpt.save(3, state._replace(step=state.step + 3), pipeline_state, (0, 2), config)
  input_dir = tmp_path / "run" / "checkpoints" / "3" / "input"
  written = sorted(n for n in os.listdir(input_dir) if n.startswith("shard-"))
  assert written == ["shard-0-of-4.json", "shard-2-of-4.json"]
  input_state.InputStateHandler().save(
      input_dir, input_state.InputStateSave(pipeline_state, (1, 3)))
  assert ckpt.input_state(3) == pipeline_state
  assert ckpt.input_state(3, (2,), 4) == {
      "num_shards": 4, "streams": {"m3w": {"2": streams["m3w"]["2"]},
                                   "vtp": {"2": streams["vtp"]["2"]}}}
  _, data = ckpt.restore(setup, input_shards=(1, 3), num_shards=4)
  assert data["pipeline"]["streams"]["m3w"] == {"1": streams["m3w"]["1"],
                                                "3": streams["m3w"]["3"]}
  # Another data axis: the pipeline refuses it with its own message.
  other = ckpt.input_state(3, (0,), 2)
  assert other == {"num_shards": 4, "streams": {}}
  # A shard's file gone: that step does not load (and an older one would be used).
  os.remove(input_dir / "shard-3-of-4.json")
  with pytest.raises(ValueError, match=r"lacks the input state of data shards \[3\]"):
    ckpt.input_state(3, (1, 3), 4)
  ckpt.close()


def test_config_change_in_the_same_workdir_is_an_error_naming_the_keys(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  workdir_lib.check_config(tiny_config, workdir, allow_change=False)        # nothing there yet
  assert not os.path.exists(workdir)                                     # and nothing written
  workdir_lib.write_config(tiny_config, workdir)
  workdir_lib.check_config(tiny_config, workdir, allow_change=False)        # same config: fine
  changed = copy.deepcopy(tiny_config)
  changed.optim.learning_rate = 3e-4
  changed.optim.b1 = 0.8
  changed.train.steps = 7                       # how the run is driven: never drift
  changed.train.on_nonfinite = "rollback"
  with pytest.raises(ValueError, match=r"\(optim.b1: 0.9 -> 0.8, optim.learning_rate: 0.001 -> "
                                       r"0.0003\); use another --workdir or pass --allow_config"):
    workdir_lib.check_config(changed, workdir, allow_change=False)
  workdir_lib.check_config(changed, workdir, allow_change=True)
  more_steps = copy.deepcopy(tiny_config)
  more_steps.train.steps = 700
  workdir_lib.check_config(more_steps, workdir, allow_change=False)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["learning_rate"] == tiny_config.optim.learning_rate


def test_frozen_towers_load_from_init_checkpoints(tiny_config, tmp_path):
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flamingo_jax import models  # pylint: disable=g-import-not-at-top
  config = small_config(tiny_config, tmp_path)
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  _, frozen = setup.init(jax.random.key(0))
  _, other = setup.init(jax.random.key(1))               # "pretrained" towers: other values
  lm, _ = hk.data_structures.partition(
      lambda module, name, value: models.component_of(module) == "lm", other)
  path = str(tmp_path / "lm_ckpt")
  saver = ocp.StandardCheckpointer()
  saver.save(path, lm)
  saver.wait_until_finished()
  config.model.lm.init_checkpoint = path
  loaded = param_sources.init_checkpoints(config.model, frozen)
  for module, name, value in hk.data_structures.traverse(loaded):
    source = other if models.component_of(module) == "lm" else frozen
    np.testing.assert_array_equal(value, source[module][name], err_msg=f"{module}/{name}")


def test_a_model_with_nothing_frozen_keeps_no_frozen_towers(tmp_path):
  """lm.trainable and vision.trainable (the few-shot demo): the frozen tree is empty, so
  there is no frozen/ to write, and resuming restores the empty tree."""
  import types  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  ckpt.save_frozen({})
  assert not os.path.exists(ckpt.frozen_directory)
  assert ckpt.restore_frozen(types.SimpleNamespace(abstract_frozen={}, frozen_shardings={})) == {}
  ckpt.close()
