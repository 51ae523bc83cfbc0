"""Faults never lose work (issue 17): damaged checkpoints heal, a diverging run stops (or
rolls back) at a good state, a failing first command writes nothing, misuse is one line."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, config_path
from flamingo_jax.data import pipeline
from flamingo_jax.training import checkpointing
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training import trainer
from train_helpers import env, losses, poison, small_config


def fault_config(tiny_config, root, **train):
  """Two streams, checkpoints every 2 steps (so a damaged 4 falls back to 2)."""
  config = small_config(tiny_config, root)
  config.train.checkpoint_every = 2
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def base(tiny_config, tmp_path_factory):
  """(root, a run stopped at step 4 with checkpoints 2 and 4, the losses of that run
  continued undisturbed to step 6)."""
  root = tmp_path_factory.mktemp("faults")
  trainer.train(fault_config(tiny_config, root, steps=4), str(root / "base"))
  shutil.copytree(root / "base", root / "reference")
  # (profiled: tracing changes no number)
  trainer.train(fault_config(tiny_config, root, steps=6, profile_steps=(5, 6)),
                str(root / "reference"))
  expected = losses(root / "reference")
  assert sorted(expected) == [1, 2, 3, 4, 5, 6]
  return root, expected


@pytest.mark.slow
def test_profile_steps_write_a_trace_of_that_window(base):
  root, _ = base
  traces = glob.glob(str(root / "reference" / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert not os.path.exists(root / "base" / "profile")


def copy_of_base(root, name):
  shutil.copytree(root / "base", root / name)
  return root / name


def largest_file(directory):
  files = [f for f in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def moved_aside(workdir):
  """Names in moved_aside/ without their time stamps."""
  directory = os.path.join(workdir, "moved_aside")
  if not os.path.isdir(directory):
    return []
  return sorted(name.split("-2026")[0].split("-20")[0] for name in os.listdir(directory))


DAMAGE = {
    # A data file of the train state cut short.
    "truncated_state_file": lambda step: truncate(largest_file(os.path.join(step, "state", "d"))),
    # The state's metadata cut short (orbax cannot even say what the step holds).
    "truncated_metadata": lambda step: truncate(os.path.join(step, "state", "_METADATA")),
    # A save killed before its commit marker.
    "no_commit_marker": lambda step: os.remove(os.path.join(step, "commit_success.txt")),
    # The run's data item gone, or one data shard's input state.
    "deleted_data_item": lambda step: shutil.rmtree(os.path.join(step, "data")),
    "deleted_input_shard": lambda step: os.remove(
        sorted(glob.glob(os.path.join(step, "input", "shard-*.json")))[0]),
    # A save killed before orbax's final rename.
    "unfinished_save": lambda step: os.rename(step, step + ".orbax-checkpoint-tmp-1795470000"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_training_goes_on(
    fault, base, tiny_config, caplog):
  root, expected = base
  workdir = copy_of_base(root, fault)
  DAMAGE[fault](str(workdir / "checkpoints" / "4"))
  with caplog.at_level("WARNING"):
    summary = trainer.train(fault_config(tiny_config, root, steps=6), str(workdir))
  assert summary["first_step"] == 2 and summary["last_step"] == 6
  kind = "unfinished" if fault == "unfinished_save" else "damaged"
  assert moved_aside(workdir) == [f"checkpoint-4-{kind}", "metrics-after-step-2"]
  assert f"checkpoint-4-{kind}" in caplog.text and "moved to" in caplog.text
  # Steps 3 and 4 ran again, exactly as before; metrics.jsonl holds each step once.
  assert losses(workdir) == expected
  ckpt = checkpointing.Checkpointer(str(workdir), keep=100)
  assert ckpt.all_steps() == [2, 4, 6]
  ckpt.close()


@pytest.mark.slow
def test_a_damaged_frozen_tower_checkpoint_is_made_again_from_the_seed(base, tiny_config, caplog):
  root, expected = base
  workdir = copy_of_base(root, "frozen")
  truncate(largest_file(str(workdir / "frozen")))
  with caplog.at_level("WARNING"):
    summary = trainer.train(fault_config(tiny_config, root, steps=6), str(workdir))
  assert summary["first_step"] == 4 and summary["last_step"] == 6
  assert moved_aside(workdir) == ["frozen-damaged"]
  assert "frozen/ does not load" in caplog.text and "made again" in caplog.text
  assert losses(workdir) == expected
  assert os.path.exists(workdir / "frozen" / "commit_success.txt")


@pytest.mark.slow
def test_a_diverging_run_stops_at_a_good_checkpoint_and_the_rerun_resumes_from_it(
    base, tiny_config):
  root, expected = base
  workdir = copy_of_base(root, "diverge")
  # The learning rate raised after 4 good steps: step 5's update blows the parameters up
  # (finite, ~1e29), step 6 on is NaN. Saving every step, step 5 is saved but never good.
  raised = fault_config(tiny_config, root, steps=12, checkpoint_every=1,
                        max_consecutive_nonfinite=3)
  raised.optim.learning_rate = 1e30
  with pytest.raises(trainer.NonFiniteError) as error:
    trainer.train(raised, str(workdir), allow_config_change=True)
  message = str(error.value)
  assert "3 non-finite steps in a row (steps 6-8)" in message
  assert "last good checkpoint is step 4 " in message
  assert "checkpoint-5-diverged" in message and "rerunning resumes from step 4" in message
  # The advice ends as a whole sentence, with the flag value that steps over steps 5-8.
  assert message.endswith("Lower the learning rate, or rerun with "
                          "--config.train.skip_batches=4 to step over the batches of steps "
                          "5-8, where it diverged."), message
  assert moved_aside(workdir) == ["checkpoint-5-diverged"]
  # Rerun with the old rate: from step 4, finite, equal to the undisturbed run.
  summary = trainer.train(fault_config(tiny_config, root, steps=6), str(workdir),
                          allow_config_change=True)
  assert summary["first_step"] == 4 and summary["last_step"] == 6
  assert losses(workdir) == expected
  assert moved_aside(workdir) == ["checkpoint-5-diverged", "metrics-after-step-4"]


@pytest.mark.slow
def test_a_learning_rate_that_overflows_stops_naming_the_checkpoint_it_came_from(
    base, tiny_config):
  root, _ = base
  workdir = copy_of_base(root, "overflow")
  raised = fault_config(tiny_config, root, steps=12, max_consecutive_nonfinite=2)
  raised.optim.learning_rate = 1e39               # inf in float32: every update rejected
  with pytest.raises(trainer.NonFiniteError, match="last good checkpoint is step 4 .*rerunning "
                                                   "resumes from step 4"):
    trainer.train(raised, str(workdir), allow_config_change=True)
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["finite_loss"], r["skipped"]) for r in rows[4:]] == [(5, 1, 1)]


@pytest.mark.slow
def test_rollback_recovers_inside_one_run(base, tiny_config, monkeypatch, capsys):
  root, _ = base
  workdir = copy_of_base(root, "rollback")
  config = fault_config(tiny_config, root, steps=8, checkpoint_every=1,
                        max_consecutive_nonfinite=2, on_nonfinite="rollback")
  poison(monkeypatch, {2, 3})         # steps 6 and 7 of this run see NaN losses
  # Skip counts as the pipeline reports them reach the console once per change.
  monkeypatch.setattr(pipeline.InputPipeline, "skipped",
                      lambda self: {"m3w": {}, "vtp": {"text_too_long": 95}})
  summary = trainer.train(config, str(workdir))
  assert summary["rollbacks"] == 1 and summary["last_step"] == 8
  out = capsys.readouterr().out
  assert "rollback: 2 non-finite steps in a row (steps 6-7); back to step 4" in out
  assert out.count("skipped examples: vtp text_too_long 95") == 1
  # Step 5 was saved, then its parameters met a NaN: not known good, moved aside.
  assert moved_aside(workdir) == ["checkpoint-5-diverged", "metrics-after-step-4"]
  got = losses(workdir)
  assert sorted(got) == list(range(1, 9))
  assert all(abs(v) < 100 for v in got.values())           # finite after the rollback
  ckpt = checkpointing.Checkpointer(str(workdir), keep=100)
  assert ckpt.all_steps() == [2, 4, 5, 6, 7, 8]
  ckpt.close()


@pytest.mark.slow
def test_a_failing_first_command_writes_nothing_and_the_corrected_one_runs(base, tiny_config):
  root, _ = base
  fresh = root / "fresh"
  bad_mesh = fault_config(tiny_config, root, steps=1)
  bad_mesh.mesh.data = 3                                   # 8 devices
  with pytest.raises(ValueError, match="mesh data=3"):
    trainer.train(bad_mesh, str(fresh))
  assert not os.path.exists(fresh)
  # A width change that cannot restore, allowed as a config change: one error, nothing moved,
  # config.json as it was; the original command then runs on.
  workdir = copy_of_base(root, "width")
  config_json = (workdir / "config.json").read_text()
  wider = fault_config(tiny_config, root, steps=6)
  wider.model.resampler.num_latents *= 2
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"checkpoint 4 holds params/.*latents with shape \(8, 32\), this "
                           r"config makes \(16, 32\)"):
    trainer.train(wider, str(workdir), allow_config_change=True)
  assert (workdir / "config.json").read_text() == config_json
  assert moved_aside(workdir) == []
  summary = trainer.train(fault_config(tiny_config, root, steps=5), str(workdir))
  assert summary["first_step"] == 4 and summary["last_step"] == 5


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "flamingo_jax.train", *args], env=env(1),
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def error_lines(result):
  return [line for line in result.stderr.splitlines()
          if line.strip() and "oneDNN" not in line and "absl::InitializeLog" not in line]


@pytest.mark.slow
def test_command_line_misuse_is_one_line(tmp_path):
  tiny = f"--config={config_path('tiny')}"
  result = run_cli("--config=no/such/config.py", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2
  assert error_lines(result) == ["error: --config=no/such/config.py: [Errno 2] No such file or "
                                 "directory: 'no/such/config.py'"]
  result = run_cli(tiny, "--config.train.stepz=3", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2
  assert error_lines(result) == ["error: --config.train.stepz=3: train has no key 'stepz'; "
                                 "did you mean 'steps'?"]
  result = run_cli(tiny, "--config.train.steps=abc", f"--workdir={tmp_path / 'w'}")
  assert error_lines(result) == ["error: --config.train.steps=abc: not a valid int (invalid "
                                 "literal for int() with base 10: 'abc')"]
  result = run_cli(f"{tiny[:-3]}.py:bogus", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2
  assert error_lines(result) == [f"error: {tiny}:bogus: unexpected 'bogus'; tiny.py takes "
                                 f"runlocal"]
  # A stream whose raw folder is missing: named before any dataset is built.
  result = run_cli(tiny, f"--workdir={tmp_path / 'w'}",
                   f"--config.data.streams.vtp.manual_dir={tmp_path / 'no_videos'}")
  assert result.returncode == 1
  assert error_lines(result) == [f"error: stream vtp: video_text source directory "
                                 f"'{tmp_path / 'no_videos'}' does not exist"]
  (tmp_path / "a_file").write_text("")
  result = run_cli(tiny, f"--workdir={tmp_path / 'a_file'}")
  assert result.returncode == 1
  assert error_lines(result) == [f"error: --workdir {tmp_path / 'a_file'} is a file, not a "
                                 f"directory"]
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_skip_batches_drops_data_once_per_resume_point(base, tiny_config, capsys):
  root, _ = base
  skipping = copy_of_base(root, "skipping")
  trainer.train(fault_config(tiny_config, root, steps=5, skip_batches=1), str(skipping))
  assert "dropping 1 batches per stream before step 5" in capsys.readouterr().out

  def data_state(workdir, step):
    ckpt = checkpointing.Checkpointer(str(workdir), keep=100)
    setup = tasks.make_train_setup(fault_config(tiny_config, root),
                                        sharding.make_mesh(-1, 1))
    _, data = ckpt.restore_step(step, setup)
    data["pipeline"] = ckpt.input_state(step)
    ckpt.close()
    return data
  # Step 5 trained on the batch the undisturbed run met at step 6: the data positions after
  # it are those of the reference run's step 6.
  assert data_state(skipping, 5)["pipeline"] == data_state(root / "reference", 6)["pipeline"]
  assert data_state(skipping, 5)["skip_batches_applied"] == 1
  # The same command again (the flag still set) resumes from 5 without dropping more.
  trainer.train(fault_config(tiny_config, root, steps=6, skip_batches=1), str(skipping))
  assert "dropping" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_restore_prints_no_tracebacks(base):
  """orbax's echoes of a failed TensorStore read ("Event loop is closed" through
  sys.unraisablehook, asyncio's unretrieved task errors) stay off the console: after a damaged
  checkpoint, and in three runs that resume over a damaged frozen/ (its echoes surface later,
  while the run saves). In a subprocess: pytest replaces sys.unraisablehook around each test,
  which would hide them."""
  root, _ = base
  workdir = copy_of_base(root, "noise")
  truncate(largest_file(str(workdir / "checkpoints" / "4" / "state" / "d")))
  # A damaged frozen/ too, three times over (its echoes came in 2 of 3 runs: asyncio's
  # _GatheringFuture and Future errors, "coroutine … was never awaited" warnings).
  frozen = [copy_of_base(root, f"noise_frozen{i}") for i in range(3)]
  for other in frozen:
    truncate(largest_file(str(other / "frozen")))
  tests = os.path.join(REPO, "tests")
  script = "\n".join([
      "import pathlib, sys",
      f"sys.path.insert(0, {tests!r})",
      "import conftest",
      "from flamingo_jax import config_base",
      "from flamingo_jax.training import checkpointing, sharding, tasks",
      "from train_helpers import small_config",
      "config = small_config(config_base.load_config(conftest.config_path('tiny')), "
      f"pathlib.Path({str(root)!r}))",
      "setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))",
      f"ckpt = checkpointing.Checkpointer({str(workdir)!r}, keep=100, heal=True)",
      "state, _ = ckpt.restore(setup)",
      "print('restored', int(state.step))",
      "ckpt.close()"])
  result = subprocess.run([sys.executable, "-c", script], env=env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  output = result.stdout + result.stderr
  config_file = root / "fault_config.py"
  config_file.write_text("\n".join([
      "import pathlib, sys",
      f"sys.path.insert(0, {tests!r})",
      "import conftest",
      "from flamingo_jax import config_base",
      "from test_faults import fault_config",
      "def get_config(arg=None):",
      "  return fault_config(config_base.load_config(conftest.config_path('tiny')), "
      f"pathlib.Path({str(root)!r}), steps=5)"]))
  for workdir in frozen:
    run = subprocess.run([sys.executable, "-m", "flamingo_jax.train", f"--config={config_file}",
                          f"--workdir={workdir}"], env=env(8), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "done: step 5" in run.stdout, run.stderr[-3000:]
    output += run.stdout + run.stderr
  assert result.returncode == 0 and "restored 2" in result.stdout, output[-3000:]
  assert "checkpoint-4-damaged" in output
  assert output.count("frozen/ does not load") == 3
  assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]
  assert "exception was never retrieved" not in output and "never awaited" not in output, \
      output[-3000:]
