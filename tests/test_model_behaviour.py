"""Flamingo's defining properties (docs/paper.md §1.4, §2, §10.2) on the tiny config."""

import copy

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import models
from flamingo_jax.models import gated_xattn
from flamingo_jax.models import perceiver
from model_helpers import random_media, set_gates, token_row

LENGTH = 24
IMAGE_POSITIONS = ([4, 12], [0, 8, 16])  # row 0: two images, row 1: three (slots: 3)


@pytest.fixture(scope="module")
def setup(tiny_config):
  cfg = tiny_config.model
  image_id = cfg.image_token_id
  ids = jnp.asarray(np.stack([token_row(LENGTH, pos, image_id, seed=i)
                              for i, pos in enumerate(IMAGE_POSITIONS)]), jnp.int32)
  media = random_media(0, (2, 3, 1, cfg.image_size, cfg.image_size, 3))
  model = models.make_flamingo(cfg)
  params = jax.jit(model.init)(jax.random.key(0), ids, media)
  return cfg, model, params, ids, media


@pytest.mark.slow
def test_at_init_media_change_nothing_and_model_equals_lm(setup):
  cfg, model, params, ids, media = setup
  apply = jax.jit(model.apply)
  other = random_media(1, media.shape)
  logits_a = apply(params, None, ids, media)
  logits_b = apply(params, None, ids, other)
  logits_lm = jax.jit(lambda p, i: model.apply(p, None, i, None))(params, ids)
  assert logits_a.shape == (2, LENGTH, cfg.vocab_size) and logits_a.dtype == jnp.float32
  np.testing.assert_array_equal(logits_a, logits_b)
  np.testing.assert_array_equal(logits_a, logits_lm)
  # The gates are the only thing hiding the media: opening them changes the logits.
  assert not np.array_equal(apply(set_gates(params, 0.5), None, ids, media), logits_a)


@pytest.mark.parametrize("immediate", [True, False])
def test_tokens_never_see_media_of_later_images(setup, immediate):
  cfg, _, params, ids, media = setup
  cfg = copy.deepcopy(cfg)
  cfg.xattn.only_attend_immediate_media = immediate
  apply = jax.jit(models.make_flamingo(cfg).apply)
  params = set_gates(params, 0.5)
  base = np.asarray(apply(params, None, ids, media))
  assert np.isfinite(base).all()
  for slot in range(3):
    changed = media.at[:, slot].set(random_media(10 + slot, media[:, slot].shape))
    out = np.asarray(apply(params, None, ids, changed))
    for row, positions in enumerate(IMAGE_POSITIONS):
      if slot >= len(positions):  # an unused slot changes nothing at all
        np.testing.assert_array_equal(out[row], base[row])
        continue
      first_seen = positions[slot]  # the slot's own <image> token already sees it
      np.testing.assert_array_equal(out[row, :first_seen], base[row, :first_seen])
      assert not np.allclose(out[row, first_seen:], base[row, first_seen:])


def _xattn_layer(immediate):
  def f(y, visual, phi):
    return gated_xattn.GatedCrossAttentionDense(
        num_heads=4, key_size=8, ffw_mult=4, only_attend_immediate_media=immediate)(y, visual, phi)
  return hk.without_apply_rng(hk.transform(f))


def _xattn_inputs():
  rng = np.random.RandomState(0)
  ids = np.stack([token_row(20, pos, 4, seed=i) for i, pos in enumerate(([3, 9], [0, 5, 14]))])
  phi = gated_xattn.media_positions(jnp.asarray(ids), 4)
  y = jnp.asarray(rng.randn(2, 20, 32), jnp.float32)
  visual = jnp.asarray(rng.randn(2, 3, 6, 16), jnp.float32)
  return y, visual, phi


@pytest.mark.parametrize("immediate", [True, False])
def test_xattn_layer_output_depends_only_on_allowed_media(immediate):
  layer = _xattn_layer(immediate)
  y, visual, phi = _xattn_inputs()
  params = set_gates(layer.init(jax.random.key(0), y, visual, phi), 0.7)
  apply = jax.jit(layer.apply)
  base = np.asarray(apply(params, y, visual, phi))
  phi = np.asarray(phi)
  for slot in range(3):
    changed = visual.at[:, slot].add(3.0)
    out = np.asarray(apply(params, y, changed, phi))
    media = slot + 1
    allowed = (phi == media) if immediate else (phi >= media)
    np.testing.assert_array_equal(out[~allowed], base[~allowed])   # bit-identical
    assert np.all(np.any(out[allowed] != base[allowed], axis=-1))  # every allowed row moved


def test_xattn_rows_without_media_get_exact_zero():
  layer = _xattn_layer(True)
  y, visual, phi = _xattn_inputs()
  params = layer.init(jax.random.key(0), y, visual, phi)
  params = hk.data_structures.map(
      lambda m, n, x: jnp.full_like(x, 1.0 if n == "alpha_xattn" else 0.0) if n.startswith("alpha") else x,
      params)  # cross-attention gate open, dense gate closed: output = y + tanh(1)·attn
  out = np.asarray(jax.jit(layer.apply)(params, y, visual, phi))
  no_media = np.asarray(phi) == 0
  assert no_media.sum() == 3  # row 0 positions 0..2
  np.testing.assert_array_equal(out[no_media], np.asarray(y)[no_media])
  assert np.all(np.any(out[~no_media] != np.asarray(y)[~no_media], axis=-1))
  assert np.isfinite(out).all()


def test_media_positions_phi_matches_figure_6():
  ids = jnp.asarray([[7, 4, 7, 7, 5, 4, 7, 5]])  # text <image> text text <EOC> <image> text <EOC>
  np.testing.assert_array_equal(gated_xattn.media_positions(ids, 4), [[0, 1, 1, 1, 1, 2, 2, 2]])
  mask, has = gated_xattn.media_attention_mask(jnp.asarray([[0, 1, 2, 3]]), 2, 2,
                                               only_attend_immediate_media=True)
  expected = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask[0, 0], expected)  # φ=3 > N=2 slots: nothing
  np.testing.assert_array_equal(has, [[False, True, True, False]])


def _resampler(num_time_embeddings=8, max_frames=32):
  def f(features):
    return perceiver.PerceiverResampler(
        num_layers=2, dim=32, num_heads=2, key_size=16, ffw_mult=4, num_latents=64,
        num_time_embeddings=num_time_embeddings, max_frames=max_frames)(features)
  return hk.without_apply_rng(hk.transform(f))


@pytest.mark.parametrize("frames", [1, 8, 30])
@pytest.mark.parametrize("positions", [4, 100])  # 64 px and 320 px frames through a stride-32 encoder
def test_resampler_output_shape_is_fixed(frames, positions):
  resampler = _resampler()
  params = resampler.init(jax.random.key(0), jnp.zeros((1, 1, 1, 4, 24)))  # built on single frames
  features = jnp.asarray(np.random.RandomState(0).randn(2, 3, frames, positions, 24), jnp.float32)
  out = jax.jit(resampler.apply)(params, features)
  assert out.shape == (2, 3, 64, 32)
  assert np.isfinite(np.asarray(out)).all()


def test_temporal_embeddings_interpolate_linearly():
  table = np.random.RandomState(0).randn(8, 4).astype(np.float32)
  np.testing.assert_array_equal(perceiver.temporal_embeddings(jnp.asarray(table), 5, 32), table[:5])
  out = np.asarray(perceiver.temporal_embeddings(jnp.asarray(table), 15, 32))  # 8 -> 15: a midpoint between rows
  np.testing.assert_allclose(out[::2], table, atol=1e-6)
  np.testing.assert_allclose(out[1], (table[0] + table[1]) / 2, atol=1e-6)
  out30 = np.asarray(perceiver.temporal_embeddings(jnp.asarray(table), 30, 32))
  np.testing.assert_allclose(out30[[0, -1]], table[[0, -1]], atol=1e-6)
  with pytest.raises(ValueError, match="33 frames.*max_frames=32"):
    perceiver.temporal_embeddings(table, 33, 32)


@pytest.mark.slow
def test_model_built_for_8_frames_runs_on_30(tiny_config):
  cfg = copy.deepcopy(tiny_config.model)
  cfg.resampler.num_time_embeddings, cfg.resampler.max_frames = 8, 32
  model = models.make_flamingo(cfg)
  ids = jnp.asarray([token_row(12, [0], cfg.image_token_id)], jnp.int32)
  size = cfg.image_size
  params = jax.jit(model.init)(jax.random.key(0), ids, random_media(0, (1, 1, 8, size, size, 3)))
  logits = jax.jit(model.apply)(set_gates(params, 0.5), None, ids,
                                random_media(1, (1, 1, 30, size, size, 3)))
  assert logits.shape == (1, 12, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_bad_inputs_raise_value_errors_naming_shapes(setup):
  cfg, model, params, ids, media = setup
  size = cfg.image_size
  with pytest.raises(ValueError, match=r"\[B, N, T, H, W, 3\].*\(2, 3, 64, 64, 3\)"):
    model.apply(params, None, ids, media[:, :, 0])
  too_many = ids.at[0, 20].set(cfg.image_token_id).at[0, 21].set(cfg.image_token_id)
  with pytest.raises(ValueError, match=r"\(2, 24\) has 4 <image> tokens.*only 3 slots"):
    model.apply(params, None, too_many, media)
  long_video = random_media(0, (2, 3, cfg.resampler.max_frames + 1, size, size, 3))
  with pytest.raises(ValueError, match=rf"T={cfg.resampler.max_frames + 1} frames.*max_frames"):
    model.apply(params, None, ids, long_video)
  with pytest.raises(ValueError, match=r"32x32 frames but config.model.image_size=64"):
    model.apply(params, None, ids, random_media(0, (2, 3, 1, 32, 32, 3)))


def test_stages_reproduce_the_full_forward(setup, tiny_config):
  cfg, model, params, ids, media = setup
  params = set_gates(params, 0.5)
  stages = models.make_flamingo_stages(cfg)
  visual = jax.jit(stages.apply.encode_media)(params, None, media)
  assert visual.shape == (2, 3, cfg.resampler.num_latents, cfg.resampler.dim)
  staged = jax.jit(stages.apply.decode)(params, None, ids, visual)
  np.testing.assert_allclose(staged, jax.jit(model.apply)(params, None, ids, media),
                             rtol=1e-5, atol=1e-5)  # separate programs: fusion order differs


def test_trainable_predicate_and_new_token_rows(setup):
  cfg, model, params, ids, media = setup
  trainable, frozen = models.split_trainable(params, cfg)
  assert {models.component_of(m) for m in frozen} == {"vision", "lm"}
  assert {models.component_of(m) for m in trainable} == {"resampler", "xattn", "lm"}
  assert sorted(m for m in trainable if models.component_of(m) == "lm") == [
      "flamingo/language_model/new_token_embed", "flamingo/language_model/new_token_unembed"]
  gates = [(m, n) for m, n, _ in hk.data_structures.traverse(trainable) if "alpha" in n]
  assert len(gates) == 4  # alpha_xattn and alpha_dense for the groups stack and the tail
  assert models.is_trainable("flamingo/vision_encoder/stem_conv0", train_vision=True)
  # lm.trainable (Table 3 xiii) and vision.trainable: nothing stays frozen, the counts agree.
  everything = cfg.copy_and_resolve_references()
  everything.lm.trainable = everything.vision.trainable = True
  all_trainable, none_frozen = models.split_trainable(params, everything)
  assert not none_frozen and len(jax.tree.leaves(all_trainable)) == len(jax.tree.leaves(params))
  counts = models.count_by_component(params, everything)
  assert counts["frozen"] == 0 and counts["trainable"] == counts["total"]
  # <image>/<EOC> read the trainable table: the frozen rows of their ids are never used.
  embed = "flamingo/language_model/token_embed"
  poked = hk.data_structures.to_mutable_dict(params)
  poked[embed]["embeddings"] = poked[embed]["embeddings"].at[
      jnp.asarray([cfg.image_token_id, cfg.eoc_token_id])].set(100.0)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(poked, None, ids, media), apply(params, None, ids, media))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla"])
def test_attention_kernels_equal_the_einsum_reference(setup, impl):
  """config.model.attention_impl: jax.nn.dot_product_attention on XLA gives
  the einsum path's logits and trainable gradients, on rows with text before the first image
  (fully masked xattn rows) and the resampler's unmasked attention."""
  cfg, model, params, ids, media = setup
  params = set_gates(params, 0.5)
  other = copy.deepcopy(cfg)
  other.attention_impl = impl
  kernel = models.make_flamingo(other)

  def loss(apply, p):
    return jnp.mean(apply(p, None, ids, media) ** 2)
  np.testing.assert_allclose(jax.jit(kernel.apply)(params, None, ids, media),
                             jax.jit(model.apply)(params, None, ids, media), rtol=1e-5, atol=1e-5)
  want = jax.jit(jax.grad(lambda p: loss(model.apply, p)))(params)
  got = jax.jit(jax.grad(lambda p: loss(kernel.apply, p)))(params)
  for path in ("flamingo/perceiver_resampler", "flamingo/language_model/groups/xattn"):
    for module in [m for m in want if m.startswith(path)]:
      for name in want[module]:
        np.testing.assert_allclose(got[module][name], want[module][name], rtol=1e-4, atol=1e-6,
                                   err_msg=f"{module}/{name}")


def test_attention_kernel_with_grouped_query_heads_and_a_cache():
  from flamingo_jax.models import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 5, 16), jnp.float32)
  # A stack of 2 layers' caches; this attention is layer 1.
  cache = {"k": jnp.asarray(rng.randn(2, 2, 2, 8, 4), jnp.float32),        # [B, N, H, S, K]
           "v": jnp.asarray(rng.randn(2, 2, 2, 8, 4), jnp.float32), "layer": jnp.int32(1)}
  positions = jnp.asarray([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
  mask = jnp.asarray(rng.rand(2, 1, 5, 8) < 0.6).at[1, 0, 2].set(False)   # a fully masked row

  def run(impl):
    def f(x):
      return attention.MultiHeadAttention(num_heads=4, num_kv_heads=2, key_size=4,
                                          model_size=16, impl=impl, name="attn")(
          x, x, mask=mask, positions=positions, rotary=attention.Rotary(10_000.0, 1.0, "half"),
          cache=cache)
    model = hk.without_apply_rng(hk.transform(f))
    return model.apply(model.init(jax.random.key(0), x), x)
  (want, want_cache), (got, got_cache) = run("einsum"), run("xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_cache["k"], want_cache["k"])
  np.testing.assert_array_equal(got_cache["k"][:, 0], cache["k"][:, 0])   # layer 0 untouched
  # Row 0's positions 3..7 of layer 1 are new, its 0..2 kept.
  np.testing.assert_array_equal(got_cache["v"][0, 1, :, :3], cache["v"][0, 1, :, :3])
  assert not np.array_equal(got_cache["v"][0, 1, :, 3:], cache["v"][0, 1, :, 3:])
  with pytest.raises(ValueError, match="attention impl='flash'; expected one of"):
    hk.transform(lambda: attention.MultiHeadAttention(
        num_heads=4, key_size=4, model_size=16, impl="flash")).init(None)


def test_layer_layout_places_xattn_blocks_by_every_and_offset():
  """(head blocks, groups, tail blocks): xattn before blocks offset, offset + every, ..."""
  from flamingo_jax.models import language_model  # pylint: disable=g-import-not-at-top
  assert language_model.layer_layout(5, 2) == (0, 2, 1)         # before 0, 2, 4
  assert language_model.layer_layout(5, 2, 1) == (1, 2, 0)      # before 1, 3
  # OpenFlamingo-4B (32 layers, every 2): before 1, 3, ..., 31 = 16 blocks.
  assert language_model.layer_layout(32, 2, 1) == (1, 15, 1)
  for bad in ((5, 2, 2), (2, 2, 1), (5, 2, -1)):
    with pytest.raises(ValueError, match="xattn.offset"):
      language_model.layer_layout(*bad)


@pytest.mark.slow
def test_nfnet_block_remat_keeps_the_parameters_and_the_outputs(monkeypatch):
  """vision.remat (a trained tower at high resolution) wraps each block in a checkpoint
  (JAX then recomputes its insides in the backward pass): the same parameter tree and the
  same features. (A small variant with a scanned stage: transition and stacked blocks.)"""
  from flamingo_jax.models.vision import nfnet  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(nfnet.NFNET_VARIANTS, "small", dict(
      nfnet.NFNET_VARIANTS["tiny"], depth=(1, 3, 1, 1)))
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  results = []
  for remat in (False, True):
    f = hk.transform(lambda x, remat=remat: nfnet.NFNet(
        "small", remat=remat, stochdepth_rate=0.1)(x, is_training=True))
    params = f.init(jax.random.key(1), images)
    jaxpr = str(jax.make_jaxpr(f.apply)(params, jax.random.key(2), images))
    assert jaxpr.count("remat2[") == (5 if remat else 0)    # 4 transition blocks + the stack
    results.append((params, jax.jit(f.apply)(params, jax.random.key(2), images)))
  (p0, y0), (p1, y1) = results
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,with_bias,dtype", [
    ((6, 5), True, jnp.float32), ((2, 3, 5), False, jnp.float32),
    ((2, 2, 3, 5), True, jnp.float32), ((4, 3, 5), True, jnp.bfloat16)])
def test_linear_gradients_equal_haiku_linear_autodiff(shape, with_bias, dtype):
  """attention.Linear (its own VJP: the weight gradient as one dot over all rows) has
  hk.Linear's parameters, outputs and gradients for the input, weight and bias, at any rank,
  inside a scanned stack (the resampler's case) and in bfloat16."""
  from flamingo_jax.models import attention  # pylint: disable=g-import-not-at-top

  def stack(cls):
    def f(x):
      def layer(x):
        h = attention.squared_relu(cls(7, with_bias=with_bias, name="ffw_in")(x))
        return x + cls(x.shape[-1], with_bias=with_bias, name="ffw_out")(h)
      return hk.layer_stack(2, name="layers")(layer)(x)
    return hk.without_apply_rng(hk.transform(f))

  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
  ours, theirs = stack(attention.Linear), stack(hk.Linear)
  params = theirs.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.1, params)      # nonzero biases
  r = jnp.asarray(np.random.default_rng(2).standard_normal(shape), dtype)
  loss = lambda model, p, x: jnp.sum((model.apply(p, x) * r).astype(jnp.float32))
  np.testing.assert_array_equal(ours.apply(params, x), theirs.apply(params, x))
  got = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(lambda p, x: loss(theirs, p, x), argnums=(0, 1)))(params, x)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol)
