"""Pure-functional Haiku modules for Flamingo. Imports nothing else of ours."""

from flamingo_jax.models.flamingo import (COMPONENTS, Flamingo, FlamingoStages, component_of,
                                          count_by_component, count_params, init_cache, is_trainable,
                                          make_flamingo,
                                          make_flamingo_stages, no_media_after_id, param_shapes,
                                          VisionBatching, split_trainable)
from flamingo_jax.models.gated_xattn import media_attention_mask, media_positions
from flamingo_jax.models.language_model import CACHE_BATCH_AXES, CACHE_HEAD_AXES, layer_layout
