"""OpenFlamingo 2.0.1 compatibility (weights/openflamingo.py): its modules' weights run in ours
with equal outputs, and a whole OpenFlamingo imported (`import_weights --kind=openflamingo`)
gives its logits. Fixtures: tests/data/openflamingo/make_fixture.py (OpenFlamingo's own
modules and model, randomised)."""

import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, config_path, needs_reference, regenerate_fixture
from flamingo_jax import config_base
from flamingo_jax import models
from flamingo_jax.models import gated_xattn
from flamingo_jax.models import perceiver
from flamingo_jax.training import param_sources
from flamingo_jax import weights
from flamingo_jax.weights import imports
from flamingo_jax.weights import openflamingo
from flamingo_jax.weights import parity

FIXTURE = os.path.join(REPO, "tests", "data", "openflamingo")
MODEL = os.path.join(FIXTURE, "model")
MODEL_MPT = os.path.join(FIXTURE, "model_mpt")
CLIP_FIXTURE = os.path.join(REPO, "tests", "data", "clip_vit", "weights.safetensors")


def _resampler_output(directory):
  ckpt = weights.SafetensorsCheckpoint(os.path.join(directory, "resampler.safetensors"))
  params, fields = openflamingo.resampler_params(dict(ckpt), dim_head=8)
  forward = hk.transform(lambda x: perceiver.PerceiverResampler(max_frames=8, **fields)(x))
  ours = {k.removeprefix("flamingo/"): v for k, v in params.items()}
  x = np.load(os.path.join(directory, "resampler_in.npy"))     # [b, media, frames, v, D]
  return np.asarray(forward.apply(ours, None, jnp.asarray(x))), fields


def test_openflamingo_resampler_runs_in_ours():
  """Its vision_x layout [b, media, frames, tokens, D] is our [B, N, T, S, C]; frames are
  concatenated with no time embedding, as its factory builds it."""
  got, fields = _resampler_output(FIXTURE)
  expected = np.load(os.path.join(FIXTURE, "resampler_out.npy"))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert fields == dict(num_layers=2, dim=32, num_heads=4, key_size=8, ffw_mult=4,
                        num_latents=6, num_time_embeddings=0, input_projection=False,
                        ffw_activation="gelu_exact")


def test_the_paper_resampler_options_differ_on_the_same_weights():
  """Each option matters: squared ReLU instead of GELU changes the output."""
  ckpt = weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "resampler.safetensors"))
  params, fields = openflamingo.resampler_params(dict(ckpt), dim_head=8)
  fields["ffw_activation"] = "squared_relu"
  forward = hk.transform(lambda x: perceiver.PerceiverResampler(max_frames=8, **fields)(x))
  ours = {k.removeprefix("flamingo/"): v for k, v in params.items()}
  x = np.load(os.path.join(FIXTURE, "resampler_in.npy"))
  got = np.asarray(forward.apply(ours, None, jnp.asarray(x)))
  expected = np.load(os.path.join(FIXTURE, "resampler_out.npy"))
  assert np.abs(got - expected).max() > 1e-2


def test_unsupported_and_foreign_tensors_are_named():
  ckpt = dict(weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "resampler.safetensors")))
  with pytest.raises(weights.CheckpointError, match="frame / media-time embeddings"):
    openflamingo.resampler_params(ckpt | {"perceiver.frame_embs": np.zeros((4, 32))},
                                  dim_head=8)
  with pytest.raises(weights.CheckpointError, match="perceiver.extra.w has no place"):
    openflamingo.resampler_params(ckpt | {"perceiver.extra.w": np.zeros(2)}, dim_head=8)
  with pytest.raises(weights.CheckpointError, match="not a multiple of dim_head 64"):
    openflamingo.resampler_params(ckpt, dim_head=64)


def _xattn_output(directory, **options):
  ckpt = weights.SafetensorsCheckpoint(os.path.join(directory, "xattn.safetensors"))
  block = openflamingo.xattn_block_params(dict(ckpt), 0)
  params = {"xattn" + (f"/{m}" if m else ""): leaves for m, leaves in block.items()}
  if options.get("media_norm"):                                   # an identity-initialised LN
    params["xattn/media_norm"] = {"scale": np.ones(24, np.float32),
                                  "offset": np.zeros(24, np.float32)}
  options = dict(media_norm=False, ffw_activation="gelu_exact") | options
  forward = hk.transform(lambda y, visual, phi: gated_xattn.GatedCrossAttentionDense(
      num_heads=4, key_size=8, ffw_mult=4, name="xattn", **options)(y, visual, phi))
  load = lambda name: np.load(os.path.join(directory, f"{name}.npy"))
  phi = np.cumsum(load("xattn_locations"), axis=-1, dtype=np.int32)   # OpenFlamingo's text_time
  return np.asarray(forward.apply(params, None, jnp.asarray(load("xattn_text")),
                                  jnp.asarray(load("xattn_media")), jnp.asarray(phi)))


def test_openflamingo_gated_block_runs_in_ours():
  """Same output on text with tokens before any image (zeroed cross-attention), two images
  in a row, and one image at position 0 with a second media slot unused."""
  expected = np.load(os.path.join(FIXTURE, "xattn_out.npy"))
  np.testing.assert_allclose(_xattn_output(FIXTURE), expected, rtol=1e-5, atol=1e-5)
  # The paper's LayerNorm on the visual tokens is a real difference on the same weights
  # (with scale 1 and offset 0 it still normalises), and so is its squared ReLU.
  assert np.abs(_xattn_output(FIXTURE, media_norm=True) - expected).max() > 1e-3
  assert np.abs(_xattn_output(FIXTURE, ffw_activation="squared_relu") - expected).max() > 1e-3


def test_openflamingo_gated_block_maps_every_tensor_and_names_a_missing_block():
  ckpt = dict(weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "xattn.safetensors")))
  block = openflamingo.xattn_block_params(ckpt, 0)
  assert block[""]["alpha_xattn"].shape == () and block[""]["alpha_dense"].shape == ()
  assert set(block) == {"", "query_norm", "ffw_norm", "cross_attention/query",
                        "cross_attention/key", "cross_attention/value",
                        "cross_attention/output", "ffw/ffw_in", "ffw/ffw_out"}
  with pytest.raises(weights.CheckpointError, match="no lang_encoder.gated_cross_attn_layers.3"):
    openflamingo.xattn_block_params(ckpt, 3)


# --- the whole model ----------------------------------------------------------------------

def _import(directory, out, source="", **kwargs):
  if directory == MODEL_MPT:        # its ViT: an open_clip folder (heads, GELU from its config)
    vision = dict(vision=os.path.join(directory, "vit"))
  else:                             # a bare OpenCLIP file: heads and activation given
    vision = dict(vision=os.path.join(directory, "vit.safetensors"), vit_heads=2,
                  vit_activation="quick_gelu")
  options = dict(lm=os.path.join(directory, "lm"), progress=False) | vision | kwargs
  return imports.run_openflamingo(source or os.path.join(directory, "checkpoint.safetensors"),
                                 str(out), **options)


def _check(directory, out, media=None):
  config = config_base.load_config(f"{config_path('openflamingo')}:{out}")
  load = lambda name: np.load(os.path.join(directory, f"{name}.npy"))
  params, _ = param_sources.load(config, str(out))
  report, _ = parity.check_logits(config.model, params, load("input_ids"),
                                 load("media") if media is None else media, load("logits"))
  return report


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  out = tmp_path_factory.mktemp("of") / "import"
  return _import(MODEL, out), out


@pytest.mark.slow
def test_imported_openflamingo_gives_its_logits(imported):
  """Its own model (create_model_and_transforms, GPT-NeoX + open_clip ViT, gated blocks before
  layers 1, 3, 5): ragged rows, 2-3 images each, text before the first image, an unused
  media slot. Padding is not compared (it masked it)."""
  report, out = imported
  assert (report["image_token_id"], report["eoc_token_id"], report["xattn_every"]) == (301, 300, 2)
  assert not report["warnings"]
  check = _check(MODEL, out)
  assert check["ok"] and check["max_abs_diff"] < 1e-4, check
  assert check["argmax_agreement"] == 1.0
  ids = np.load(os.path.join(MODEL, "input_ids.npy"))
  assert check["positions"] == int((ids != 302).sum())                  # <PAD> is 302
  with open(os.path.join(out, "model.json")) as f:
    fields = json.load(f)
  assert fields["xattn"] | fields["resampler"] == fields["xattn"] | {
      "num_layers": 6, "dim": 32, "num_heads": 8, "key_size": 64, "ffw_mult": 4,
      "num_latents": 64, "num_time_embeddings": 0, "input_projection": False,
      "ffw_activation": "gelu_exact"}
  assert {k: fields["xattn"][k] for k in ("every", "offset", "media_norm")} == {
      "every": 2, "offset": 1, "media_norm": False}
  assert fields["vocab_size"] == 384 and fields["lm"]["valid_vocab_size"] == 303
  # The images matter (the comparison is not the LM's alone): other pixels, other logits.
  other = np.load(os.path.join(MODEL, "media.npy"))[::-1].copy()
  assert _check(MODEL, out, media=other)["max_abs_diff"] > 1e-2


@pytest.mark.slow
def test_imported_openflamingo_with_an_mpt_lm_gives_its_logits(tmp_path):
  """OpenFlamingo-3B/9B's layout: its factory around an MPT (transformers' MptForCausalLM:
  ALiBi, clip_qkv, tied embeddings, blocks at transformer.blocks), gated blocks every 3 layers
  (before layers 2 and 5: a head, a group and a tail here), a GELU ViT whose activation comes
  from its open_clip_config.json."""
  report = _import(MODEL_MPT, tmp_path / "of_mpt")
  assert report["lm_kind"] == "mpt" and report["xattn_every"] == 3 and not report["warnings"]
  check = _check(MODEL_MPT, tmp_path / "of_mpt")
  assert check["ok"] and check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0, check
  with open(tmp_path / "of_mpt" / "model.json") as f:
    fields = json.load(f)
  assert fields["vision"]["vit"]["activation"] == "gelu" and fields["vision"]["vit"]["heads"] == 2
  assert fields["lm"]["alibi_bias_max"] == 8.0 and fields["lm"]["tied_embeddings"]
  # The activation its config names is what makes the logits equal.
  _import(MODEL_MPT, tmp_path / "quick", vit_activation="quick_gelu")
  assert _check(MODEL_MPT, tmp_path / "quick")["max_abs_diff"] > 1e-3


def test_openclip_activation_comes_from_its_config_and_a_bare_file_needs_the_flag(tmp_path):
  from flamingo_jax.weights import vision  # pylint: disable=g-import-not-at-top
  folder = os.path.join(MODEL_MPT, "vit")
  assert vision.load_clip_vit(folder)[1]["vision"]["vit"]["activation"] == "gelu"
  quick = tmp_path / "quick"
  quick.mkdir()
  os.symlink(os.path.join(folder, "open_clip_model.safetensors"),
             quick / "open_clip_model.safetensors")
  (quick / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": {"quick_gelu": True, "vision_cfg": {"width": 32, "head_width": 16}}}))
  assert vision.load_clip_vit(str(quick))[1]["vision"]["vit"]["activation"] == "quick_gelu"
  assert vision.load_clip_vit(str(quick), activation="gelu")[1]["vision"]["vit"][
      "activation"] == "gelu"
  with pytest.raises(weights.CheckpointError, match="pass --vit_activation=quick_gelu"):
    vision.load_clip_vit(os.path.join(MODEL, "vit.safetensors"), heads=2)


def test_openflamingo_trainable_set_is_ours(imported):
  """Its trainable tensors (resampler, gated blocks; the trained token table's new rows) are
  exactly our trainable parameters, and a fresh run starts from them."""
  _, out = imported
  config = config_base.load_config(f"{config_path('openflamingo')}:{out}")
  params, from_seed = param_sources.load(config, str(out))
  assert not from_seed
  trainable, frozen = hk.data_structures.partition(
      lambda module, name, value: models.is_trainable(module), params)
  ckpt = dict(weights.SafetensorsCheckpoint(os.path.join(MODEL, "checkpoint.safetensors")))
  size = lambda tree: sum(int(np.prod(v.shape)) for _, _, v in
                          hk.data_structures.traverse(tree))
  theirs = sum(v.size for k, v in ckpt.items() if "embed" not in k)
  new_rows = [m for m in trainable if "new_token" in m]
  assert sorted(new_rows) == ["flamingo/language_model/new_token_embed",
                              "flamingo/language_model/new_token_unembed"]
  assert size(trainable) - 2 * 2 * 32 == theirs
  embed = ckpt["lang_encoder.gpt_neox.embed_in.weight"].astype(np.float32)
  unembed = ckpt["lang_encoder.embed_out.weight"].astype(np.float32)
  lm = "flamingo/language_model"
  np.testing.assert_array_equal(trainable[f"{lm}/new_token_embed"]["embeddings"],
                                embed[[301, 300]])
  np.testing.assert_array_equal(trainable[f"{lm}/new_token_unembed"]["w"],
                                unembed[[301, 300]].T)
  assert {models.component_of(m) for m in frozen} == {"lm", "vision"}
  fresh = jax.tree.map(np.zeros_like, trainable)
  started = param_sources.init_trainable(config.model, fresh)
  jax.tree.map(np.testing.assert_array_equal, started, trainable)


def run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True,
                        text=True)


@pytest.mark.slow
def test_openflamingo_import_and_check_command_lines(tmp_path):
  out = tmp_path / "of"
  result = run_tool("flamingo_jax.tools.import_weights", "--kind=openflamingo",
                    f"--source={MODEL}/checkpoint.safetensors", f"--lm={MODEL}/lm",
                    f"--vision={MODEL}/vit.safetensors", "--vit_heads=2",
                    "--vit_activation=quick_gelu", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"run it: --config=experiments/configs/openflamingo.py:{out}" in result.stdout
  assert sorted(os.listdir(out)) == ["model.json", "params", "special_tokens.json",
                                     "tokenizer.json"]
  result = run_tool("flamingo_jax.tools.check_logits",
                    f"--config={config_path('openflamingo')}:{out}", f"--params={out}",
                    f"--input_ids={MODEL}/input_ids.npy", f"--media={MODEL}/media.npy",
                    f"--reference={MODEL}/logits.npy")
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-2000:]


def test_openflamingo_bad_input_is_named_and_writes_nothing(tmp_path):
  out = tmp_path / "of"
  cases = [
      (dict(source=os.path.join(REPO, "tests", "data", "hf_lms", "gpt_neox")),
       "not part of an OpenFlamingo model"),
      (dict(vision=""), "holds no vision_encoder"),
      (dict(base_vocab=290), "token table has 303 rows but the base tokenizer 290 ids"),
      (dict(lm=os.path.join(REPO, "tests", "data", "hf_lms", "llama")),
       r"layers \[1, 3, 5\], which is no cross_attn_every_n_layers of a 3-layer LM"),
      # A ViT 64 wide where its resampler reads 32-wide tokens.
      (dict(vision=CLIP_FIXTURE),
       "is 64 wide but the checkpoint's resampler reads 32-wide tokens"),
      (dict(dim_head=48), "not a multiple of dim_head 48"),
  ]
  for kwargs, message in cases:
    with pytest.raises(weights.CheckpointError, match=message):
      _import(MODEL, out, **kwargs)
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))
  garbage = tmp_path / "checkpoint.pt"
  garbage.write_bytes(b"not a torch file")
  with pytest.raises(weights.CheckpointError, match="needs torch|cannot be read with torch"):
    openflamingo.read_checkpoint(str(garbage))
  with pytest.raises(weights.CheckpointError, match="no cross_attn_every_n_layers"):
    openflamingo.xattn_every([1, 2], 6)


@needs_reference("open_flamingo", "torch", script="tests/data/openflamingo/make_fixture.py")
def test_openflamingo_fixture_regenerates_with_the_installed_library(tmp_path):
  regenerate_fixture(os.path.join(FIXTURE, "make_fixture.py"), tmp_path)
  got, _ = _resampler_output(str(tmp_path))
  np.testing.assert_allclose(got, np.load(str(tmp_path / "resampler_out.npy")),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_xattn_output(str(tmp_path)),
                             np.load(str(tmp_path / "xattn_out.npy")), rtol=1e-5, atol=1e-5)
  # The whole model, read from its torch checkpoint.pt (torch.load(weights_only=True)).
  directory = str(tmp_path / "model")
  _import(directory, tmp_path / "from_pt", source=os.path.join(directory, "checkpoint.pt"))
  assert _check(directory, tmp_path / "from_pt")["max_abs_diff"] < 1e-4
  mpt = str(tmp_path / "model_mpt")
  _import(MODEL_MPT, tmp_path / "mpt_pt", source=os.path.join(mpt, "checkpoint.pt"),
          lm=os.path.join(mpt, "lm"), vision=os.path.join(mpt, "vit"))
  assert _check(mpt, tmp_path / "mpt_pt")["max_abs_diff"] < 1e-4
