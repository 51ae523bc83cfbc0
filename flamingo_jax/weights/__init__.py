"""Pretrained-weight import (docs/design.md §2): safetensors readers, per-family name maps,
loading straight into shardings. Imports `models` only."""

from flamingo_jax.weights.families import FAMILIES, lm_config_from_hf
from flamingo_jax.weights.loading import (check_vision_import, export_lm, import_plan, layer_slot, lm_param_shapes,
                                          lm_param_shapes_tree,
                                          load_lm, pytree_metadata, restore_params,
                                          save_params, stored_param_names)
from flamingo_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint
