"""Partition rules and mesh checks (docs/design.md §8): the path -> spec table is a contract."""

import json
import os

import jax
import pytest

from conftest import REPO, config_path
from flamingo_jax import models
from flamingo_jax.training import sharding

SNAPSHOT = os.path.join(os.path.dirname(__file__), "data", "tiny_partition_specs.json")


def test_tiny_partition_spec_table_matches_snapshot(tiny_config):
  """Renaming a module or changing a rule changes this table: update the snapshot on purpose."""
  table = sharding.spec_table(models.param_shapes(tiny_config.model))
  with open(SNAPSHOT) as f:
    assert table == json.load(f)


def test_zero1_adds_data_on_largest_free_dividing_dim():
  P = jax.sharding.PartitionSpec
  assert sharding.zero1_spec(P(None, None, "model"), (2, 64, 256), 8) == P(None, "data", "model")
  assert sharding.zero1_spec(P("model", None), (512, 64), 8) == P("model", "data")
  assert sharding.zero1_spec(P(None), (2,), 8) == P(None)  # nothing divides: stays replicated


def test_mesh_errors_name_the_numbers(tiny_config):
  with pytest.raises(ValueError, match=r"data=3 x model=1 = 3 but there are 8 devices"):
    sharding.make_mesh(3, 1)
  with pytest.raises(ValueError, match=r"model=3 does not divide the 8 devices"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match=r"model=8 does not divide model.lm.num_heads=4"):
    sharding.check_model_fits_mesh(tiny_config.model, 8)
  with pytest.raises(ValueError, match=r"stream 'm3w': batch_size=8 is not divisible by mesh data=4 x microbatches=4"):
    sharding.check_batches_fit_mesh(tiny_config.data.streams, 4, {"m3w": 4})
  with pytest.raises(ValueError, match=r"no partition rule matches foo/bar/w \(2000, 1000\)"):
    sharding.spec_for("foo/bar/w", (2000, 1000))
  assert sharding.spec_for("foo/bar/w", (1000, 1000)) == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("name,data", [("flamingo_3b", 64), ("flamingo_9b", 32),
                                       ("flamingo_80b", 96)])
def test_paper_configs_name_batches_their_pod_mesh_divides(name, data):
  """One rule for training and aot_compile: the configs' batches divide data x microbatches
  on the slice each is sized for (WORKSPACE.md, pod configs); nothing rounds them."""
  from flamingo_jax import config_base  # pylint: disable=g-import-not-at-top
  config = config_base.load_config(config_path(name))
  sharding.check_batches_fit_mesh(config.data.streams, data, config.train.microbatches)


def test_aot_compile_refuses_a_batch_the_mesh_does_not_divide(tiny_config):
  import copy  # pylint: disable=g-import-not-at-top
  from flamingo_jax.tools import aot_compile  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(tiny_config)
  config.data.streams.m3w.batch_size = 12
  with pytest.raises(ValueError, match="stream 'm3w': batch_size=12 is not divisible by mesh "
                                       "data=8"):
    aot_compile.compile_report(config, "cpu", "data=8,model=1")
  assert config.data.streams.m3w.batch_size == 12


def test_assign_data_shards_by_hand():
  # 2 processes x 2 devices, mesh data 2 x model 2, devices in process order: one shard each.
  assert sharding.assign_data_shards([[0, 0], [1, 1]]) == [(0,), (1,)]
  # Model groups spanning both processes: both feed both shards.
  assert sharding.assign_data_shards([[0, 1], [0, 1]]) == [(0, 1), (0, 1)]
  # 4 processes, data 2 x model 4 (the 4-process test's layout): a group spans 2 processes.
  assert sharding.assign_data_shards([[0, 0, 1, 1], [2, 2, 3, 3]]) == [(0,), (0,), (1,), (1,)]
  with pytest.raises(ValueError, match=r"unequal input work: process 0 feeds data shards "
                                       r"\[0, 1\], process 1 feeds \[1\]"):
    sharding.assign_data_shards([[0, 0], [0, 1]])
  with pytest.raises(ValueError, match=r"processes \[1\] own no device"):
    sharding.assign_data_shards([[0, 0], [2, 2]])


@pytest.mark.parametrize("name,topology,processes,shards_each,feeders", [
    ("flamingo_80b", "v4:8x12x16", 384, 4, 16),     # v4-3072, data 96 x model 16
    ("flamingo_3b", "v4:4x4x4", 16, 4, 1),          # v4-128, data 64 x model 1
])
def test_paper_configs_feed_every_data_shard_of_their_slice(name, topology, processes,
                                                            shards_each, feeders):
  """The real device layout of the slice (libtpu's topology: each chip's host): every data
  shard is fed, and every host holding a device of a model group feeds that group's shard.
  The 80B's model groups lie on 16-chip rings across 16 hosts, so each host feeds 4 shards."""
  from flamingo_jax import config_base  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config = config_base.load_config(config_path(name))
  plan = trainer.dry_run(config, topology)
  assert plan["processes"] == processes and plan["shards_per_process"] == shards_each
  assert plan["processes_per_shard"] == [feeders]
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model,
                            sharding.topology_devices(topology))
  grid = sharding.process_grid(mesh)
  for shard, row in enumerate(grid):
    assert all(shard in plan["assignment"][p] for p in set(row.tolist()))
  fed = sorted(d for shards in plan["assignment"] for d in shards)
  assert sorted(set(fed)) == list(range(mesh.shape["data"]))
  for stream, batch in plan["batch"].items():
    assert plan["rows_per_shard"][stream] * mesh.shape["data"] == batch


@pytest.mark.slow
def test_train_dry_run_on_the_80b_slice_from_the_command_line():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, "-m", "flamingo_jax.train",
                           f"--config={config_path('flamingo_80b')}", "--dry_run=v4:8x12x16"],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "384 processes, mesh data=96 x model=16" in result.stdout
  assert "m3w: global batch 288 = 96 shards x 3 rows; 12 rows per process" in result.stdout
