"""Partition rules and mesh checks (DESIGN.md §8): the path -> spec table is a contract."""

import json
import os

import jax
import pytest

from conftest import config_path
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
