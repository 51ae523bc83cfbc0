"""Pretrained LM import (flamingo_jax/weights, tools/import_weights, tools/check_logits).

The references are tiny random models written by the real `transformers` library
(tests/data/hf_lms/make_fixtures.py, which also wrote their logits); when transformers is
installed the script is rerun and the fresh models are compared too.
"""

import json
import os
import shutil
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, config_path, needs_reference, regenerate_fixture
from flamingo_jax import config_base
from flamingo_jax.data import preprocessing
from flamingo_jax.data import tokenizer as tok
from flamingo_jax import models
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax import weights
from flamingo_jax.weights import imports

FIXTURES = os.path.join(REPO, "tests", "data", "hf_lms")
FAMILIES = {"llama": "llama", "mistral": "llama", "gpt_neox": "gpt_neox", "gemma": "gemma",
            "mpt": "mpt", "mpt_options": "mpt", "mosaic_gpt": "mosaic_gpt"}


def model_for(source: str, xattn_every: int = 1, **overrides):
  """The tiny config's Flamingo around the LM of `source` (an HF folder)."""
  kind, fields = weights.import_plan(source, xattn_every=xattn_every)
  base = config_base.load_config(config_path("tiny")).model
  model = config_base.with_imported_lm(base, fields)
  model.lm.update(overrides)
  return kind, model


def text_logits(model_config, params, ids):
  return np.asarray(jax.jit(models.make_flamingo(model_config).apply)(
      params, None, jnp.asarray(ids), None))


def compare_with_reference(source: str, **overrides) -> tuple[float, float]:
  """(max |diff| over real tokens, argmax agreement) of our import vs the library's logits."""
  kind, model = model_for(source, **overrides)
  params, _ = weights.load_lm(source, model, kind)
  ref = np.load(os.path.join(source, "reference.npz"))
  ours = text_logits(model, params, ref["input_ids"])
  vocab = ref["logits"].shape[-1]
  real = ref["attention_mask"]
  diff = np.abs(ours[..., :vocab] - ref["logits"])[real]
  agree = np.mean((ours[..., :vocab].argmax(-1) == ref["logits"].argmax(-1))[real])
  # Ids past the checkpoint's vocabulary and our two new tokens are padding: never predicted.
  valid = model.lm.valid_vocab_size or model.vocab_size
  assert np.all(ours[..., valid:] == np.finfo(np.float32).min)
  return float(diff.max()), float(agree)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_equal_transformers(name):
  max_diff, agreement = compare_with_reference(os.path.join(FIXTURES, name))
  assert max_diff < 1e-4, max_diff
  assert agreement == 1.0


def test_options_are_what_make_the_logits_equal():
  """The sliding window (Mistral) and partial rotary (GPT-NeoX) really act: without them the
  same weights give other logits."""
  assert compare_with_reference(os.path.join(FIXTURES, "mistral"), sliding_window=0)[0] > 1e-3
  assert compare_with_reference(os.path.join(FIXTURES, "gpt_neox"), rotary_fraction=1.0)[0] > 1e-3


@pytest.mark.slow
def test_mpt_options_are_what_make_the_logits_equal():
  """MPT: ALiBi (6 heads: interleaved slopes), clip_qkv, its softmax scale; MosaicML's
  options: alibi_bias_max 4, the logit scale, QK LayerNorm (mosaic_gpt with it left out: its
  q_ln / k_ln tensors have no place)."""
  mpt = os.path.join(FIXTURES, "mpt")
  for option, value in (("alibi_bias_max", 0.0), ("clip_qkv", 0.0), ("attention_scale", 0.0)):
    assert compare_with_reference(mpt, **{option: value})[0] > 1e-3, option
  options = os.path.join(FIXTURES, "mpt_options")
  assert compare_with_reference(options, alibi_bias_max=8.0)[0] > 1e-3
  assert compare_with_reference(options, logit_scale=1.0)[0] > 1e-3
  kind, fields = weights.lm_config_from_hf(options)
  assert kind == "mpt" and fields["qk_norm"] and fields["norm_bias"] and fields["ffw_size"] == 96
  assert not fields["tied_embeddings"] and fields["logit_scale"] == pytest.approx(32 ** -0.5)
  kind, fields = weights.lm_config_from_hf(os.path.join(FIXTURES, "mosaic_gpt"))
  assert (kind, fields["qk_norm"], fields["tied_embeddings"], fields["rotary_fraction"],
          fields["alibi_bias_max"], fields["activation"]) == ("mosaic_gpt", True, True, 0.0,
                                                              8.0, "gelu_exact")
  with pytest.raises(weights.CheckpointError, match=r"self_attention/(query|key)_norm.*qk_norm"):
    compare_with_reference(os.path.join(FIXTURES, "mosaic_gpt"), qk_norm=False)


def test_alibi_slopes_are_mpts():
  from flamingo_jax.models import attention  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(attention.alibi_slopes(8, 8), 2.0 ** -np.arange(1, 9))
  # 6 heads: the 8-head slopes of bias_max 8, odd ones then even ones, the first 6.
  eight = 2.0 ** -np.arange(1, 9)
  np.testing.assert_allclose(attention.alibi_slopes(6, 8),
                             np.concatenate([eight[1::2], eight[::2]])[:6])
  np.testing.assert_allclose(attention.alibi_slopes(4, 4), 2.0 ** -np.arange(1, 5))


def test_lm_config_from_hf_reads_each_family():
  kind, lm = weights.lm_config_from_hf(os.path.join(FIXTURES, "llama"))
  assert kind == "llama" and lm["num_kv_heads"] == 2 and lm["ffw"] == "gated"
  assert lm["activation"] == "silu" and lm["rotary_max_wavelength"] == 500_000.0
  assert lm["vocab_size"] == 320 and lm["norm_eps"] == 1e-5
  kind, lm = weights.lm_config_from_hf(os.path.join(FIXTURES, "gpt_neox"))
  assert (kind, lm["rotary_fraction"], lm["parallel_residual"]) == ("gpt_neox", 0.25, True)
  assert (lm["norm"], lm["norm_bias"], lm["activation"]) == ("layer", True, "gelu_exact")
  kind, lm = weights.lm_config_from_hf(os.path.join(FIXTURES, "gemma"))
  assert (lm["key_size"], lm["num_kv_heads"], lm["tied_embeddings"]) == (24, 1, True)
  assert lm["embed_multiplier"] == pytest.approx(32 ** 0.5)
  kind, lm = weights.lm_config_from_hf(os.path.join(FIXTURES, "mistral"))
  assert (kind, lm["sliding_window"]) == ("llama", 4)


def test_new_tokens_are_appended_and_start_at_the_mean_row():
  source = os.path.join(FIXTURES, "gpt_neox")
  kind, model = model_for(source)
  assert (model.image_token_id, model.eoc_token_id) == (320, 321)
  assert model.vocab_size == 384 and model.lm.valid_vocab_size == 322
  params, _ = weights.load_lm(source, model, kind, dtype="bfloat16")
  table = weights.SafetensorsCheckpoint(source).read("gpt_neox.embed_in.weight")
  new = params["flamingo/language_model/new_token_embed"]["embeddings"]
  assert new.dtype == jnp.float32                     # trainable rows stay float32
  np.testing.assert_allclose(new, np.stack([table.mean(0)] * 2), rtol=1e-6)
  assert params["flamingo/language_model/token_embed"]["embeddings"].dtype == jnp.bfloat16


@pytest.mark.parametrize("model_axis", [2, 4])
def test_sharded_load_equals_one_device_load(model_axis):
  """llama: 4 query heads on 2 key/value heads, split over 'model' (2) or replicated (4)."""
  source = os.path.join(FIXTURES, "llama")
  kind, model = model_for(source)
  single, _ = weights.load_lm(source, model, kind)
  mesh = sharding.make_mesh(-1, model_axis)
  specs = sharding.param_specs(weights.lm_param_shapes_tree(model),
                               sharding.rules_for(model, model_axis))
  sharded, _ = weights.load_lm(source, model, kind, shardings=sharding.named(mesh, specs))
  query = sharded["flamingo/language_model/groups/blocks/block/self_attention/query"]["w"]
  key = sharded["flamingo/language_model/groups/blocks/block/self_attention/key"]["w"]
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "model")
  # 2 key/value heads: split over 'model' = 2, replicated over 'model' = 4.
  assert tuple(key.sharding.spec) == ((None, None, None, "model") if model_axis == 2 else
                                      (None,) * 4)
  assert len(query.addressable_shards) == 8
  for module, name, value in hk.data_structures.traverse(single):
    np.testing.assert_array_equal(np.asarray(sharded[module][name]), np.asarray(value))
  ids = np.load(os.path.join(source, "reference.npz"))["input_ids"]
  np.testing.assert_allclose(text_logits(model, sharded, ids), text_logits(model, single, ids),
                             atol=1e-5)


@pytest.mark.slow
def test_chinchilla_export_reimports_under_another_grouping(tmp_path):
  """Our own layout round-trips, and re-imports regrouped (xattn every 1 -> every 2, and
  every 2 with offset 1)."""
  source = os.path.join(FIXTURES, "llama")
  kind, model = model_for(source, xattn_every=1)
  params, _ = weights.load_lm(source, model, kind)
  weights.export_lm(params, model, str(tmp_path / "native"))
  kind2, regrouped = weights.import_plan(str(tmp_path / "native"), "chinchilla", xattn_every=2)
  assert kind2 == "chinchilla" and regrouped["lm"]["num_kv_heads"] == 2
  model2 = config_base.with_imported_lm(model, regrouped)
  params2, _ = weights.load_lm(str(tmp_path / "native"), model2, "chinchilla")
  for layer in range(model.lm.num_layers):
    (p1, i1), (p2, i2) = weights.layer_slot(model, layer), weights.layer_slot(model2, layer)
    for sub, name in (("self_attention/key", "w"), ("ffw/ffw_gate", "w"), ("ffw_norm", "scale")):
      np.testing.assert_array_equal(params[f"{p1}/{sub}"][name][i1], params2[f"{p2}/{sub}"][name][i2])
  ids = np.load(os.path.join(source, "reference.npz"))["input_ids"]
  np.testing.assert_array_equal(text_logits(model, params, ids), text_logits(model2, params2, ids))
  # OpenFlamingo's placement (xattn before blocks 1, 3, ...): a head block, then the groups;
  # the layers land where layer_slot says and export back to the same tensors.
  model3 = model2.copy_and_resolve_references()
  model3.xattn.offset = 1
  assert weights.layer_slot(model3, 0) == ("flamingo/language_model/head_blocks/block", (0,))
  assert weights.layer_slot(model3, 2) == ("flamingo/language_model/groups/blocks/block", (0, 1))
  params3, _ = weights.load_lm(str(tmp_path / "native"), model3, "chinchilla")
  np.testing.assert_array_equal(text_logits(model, params, ids), text_logits(model3, params3, ids))
  weights.export_lm(params3, model3, str(tmp_path / "offset"))
  first = weights.SafetensorsCheckpoint(str(tmp_path / "native"))
  again = weights.SafetensorsCheckpoint(str(tmp_path / "offset"))
  assert sorted(first.tensors) == sorted(again.tensors)
  for name in first.tensors:
    np.testing.assert_array_equal(first.read(name), again.read(name), err_msg=name)


def test_spec_table_of_every_lm_option_matches_snapshot():
  """Every parameter the LM options add has a rule (snapshot: update it on purpose)."""
  model = config_base.load_config(config_path("tiny")).model
  model.lm.update(num_kv_heads=2, ffw="gated", qkv_bias=True, output_bias=True, ffw_bias=True,
                  norm="layer", norm_bias=True, tied_embeddings=True)
  table = sharding.spec_table(models.param_shapes(model), sharding.rules_for(model, 2))
  with open(os.path.join(REPO, "tests", "data", "lm_options_partition_specs.json")) as f:
    assert table == json.load(f)
  replicated_kv = sharding.spec_table(models.param_shapes(model), sharding.rules_for(model, 4))
  assert replicated_kv["flamingo/language_model/groups/blocks/block/self_attention/key/w"] == "(None, None, None, None)"


def test_interleaved_rotary_is_the_half_layout_on_permuted_dims():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  from flamingo_jax.models import attention
  perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])     # pairs (2i, 2i+1) -> (i, i+4)
  half = attention.apply_rotary(x[..., perm], pos, 100.0, layout="half")
  inter = attention.apply_rotary(x, pos, 100.0, layout="interleaved")
  np.testing.assert_allclose(inter[..., perm], half, atol=1e-6)
  partial = attention.apply_rotary(x, pos, 100.0, fraction=0.5)
  np.testing.assert_array_equal(partial[..., 4:], x[..., 4:])          # pass-through dims
  np.testing.assert_allclose(partial[..., :4], attention.apply_rotary(x[..., :4], pos, 100.0),
                             atol=1e-6)


# --- command lines and bad input ---------------------------------------------------------

def import_error(tmp_path, source, kind, **kwargs) -> str:
  out = tmp_path / "out"
  with pytest.raises(weights.CheckpointError) as info:
    imports.run_lm(kind, str(source), str(out), progress=False, **kwargs)
  assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))    # nothing written
  message = str(info.value)
  assert "\n" not in message
  return message


def copy_fixture(tmp_path, name) -> str:
  path = tmp_path / f"src_{name}_{len(list(tmp_path.glob('src_*')))}"
  shutil.copytree(os.path.join(FIXTURES, name), path)
  return str(path)


def edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path):
  assert "does not exist" in import_error(tmp_path, tmp_path / "nowhere", "llama")
  shard_missing = copy_fixture(tmp_path, "llama")
  os.remove(os.path.join(shard_missing, "model-00003-of-00010.safetensors"))
  assert "model-00003-of-00010.safetensors" in import_error(tmp_path, shard_missing, "llama")
  truncated = copy_fixture(tmp_path, "gpt_neox")
  path = os.path.join(truncated, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1000)
  assert "truncated" in import_error(tmp_path, truncated, "gpt_neox")
  assert "--kind=llama but" in import_error(tmp_path, os.path.join(FIXTURES, "gpt_neox"), "llama")
  mismatch = copy_fixture(tmp_path, "gemma")
  edit_config(mismatch, num_attention_heads=4)
  assert "shape mismatch" in import_error(tmp_path, mismatch, "gemma")
  scaled = copy_fixture(tmp_path, "llama")
  edit_config(scaled, rope_scaling={"rope_type": "linear", "factor": 2.0})
  assert "rope_scaling" in import_error(tmp_path, scaled, "llama")
  gemma2 = copy_fixture(tmp_path, "mistral")
  edit_config(gemma2, model_type="gemma2")
  assert "model_type 'gemma2'" in import_error(tmp_path, gemma2, None)
  extra = copy_fixture(tmp_path, "mistral")
  edit_config(extra, num_hidden_layers=1)
  assert "source layer 1 but config.model.lm.num_layers=1" in import_error(tmp_path, extra, "llama")
  # MPT features we cannot represent: one line naming the option.
  for option in ("prefix_lm", "attn_uses_sequence_id"):
    mpt = copy_fixture(tmp_path, "mpt")
    with open(os.path.join(mpt, "config.json")) as f:
      attn = json.load(f)["attn_config"]
    edit_config(mpt, attn_config=dict(attn, **{option: True}))
    assert f"mpt checkpoint option attn_config.{option}=True is not supported" in \
        import_error(tmp_path, mpt, "mpt")
  mpt = copy_fixture(tmp_path, "mpt")
  edit_config(mpt, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2})
  assert "attn_config.attn_type='grouped_query_attention'" in import_error(tmp_path, mpt, "mpt")
  mosaic = copy_fixture(tmp_path, "mosaic_gpt")
  edit_config(mosaic, alibi=False)
  assert "learned absolute positions" in import_error(tmp_path, mosaic, "mosaic_gpt")


def run_tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True,
                        text=True)


@pytest.mark.slow
def test_import_and_check_logits_command_lines(tmp_path):
  source = os.path.join(FIXTURES, "gpt_neox")
  out = str(tmp_path / "neox")
  result = run_tool("flamingo_jax.tools.import_weights", "--kind=gpt_neox", f"--source={source}",
                    f"--output={out}", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["tensors"] == 40 and report["tokenizer"]
  assert sorted(os.listdir(out)) == ["model.json", "params", "special_tokens.json",
                                     "tokenizer.json"]
  ref = np.load(os.path.join(source, "reference.npz"))
  np.save(tmp_path / "ids.npy", ref["input_ids"][:1])                  # the unpadded row
  np.save(tmp_path / "ref.npy", ref["logits"][:1])
  check = ["flamingo_jax.tools.check_logits", f"--config={config_path('pretrained')}:lm={out}",
           f"--params={out}", f"--input_ids={tmp_path / 'ids.npy'}"]
  result = run_tool(*check, f"--reference={tmp_path / 'ref.npy'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
  np.save(tmp_path / "wrong.npy", ref["logits"][:1] + 1e-3)
  result = run_tool(*check, f"--reference={tmp_path / 'wrong.npy'}")
  assert result.returncode == 1 and "FAIL" in result.stdout
  again = run_tool("flamingo_jax.tools.import_weights", "--kind=gpt_neox", f"--source={source}",
                   f"--output={out}")
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1].startswith("error: --output")


# --- tokenizer.json in the pipeline -------------------------------------------------------

def test_hf_tokenizer_places_our_special_ids(tmp_path):
  source = os.path.join(FIXTURES, "llama")
  _, fields = weights.import_plan(source)
  shutil.copy(os.path.join(source, "tokenizer.json"), tmp_path / "tokenizer.json")
  imports.write_tokenizer(source, str(tmp_path), fields)
  tk = tok.load(str(tmp_path / "tokenizer.json"))
  assert tk.special == tok.SpecialIds(pad=1, bos=0, eos=0, image=320, eoc=321)
  ids = preprocessing.pair_tokens("a red circle", tk.encode, False, tk.special)
  assert ids[:2] == [0, 320] and ids[-2:] == [321, 0]
  assert 320 not in tk.encode("look: <image> and <EOC>")               # text cannot inject them
  assert tk.decode(ids) == "<|endoftext|><image>a red circle<EOC><|endoftext|>"
  arrays = preprocessing.to_arrays(ids, 10, tk.special)
  # pad (1) differs from EOS (0) here; the mask comes from the length either way: the final
  # EOS target counts, the padding after it does not.
  n = len(ids) - 1
  assert arrays["loss_mask"][:n].tolist() == [0.0] + [1.0] * (n - 1)
  assert not arrays["loss_mask"][n:].any()


# --- training on top of an import ---------------------------------------------------------

@pytest.mark.slow
def test_tiny_flamingo_trains_on_an_imported_lm(tmp_path):
  from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "neox")
  imports.run_lm("gpt_neox", os.path.join(FIXTURES, "gpt_neox"), out, progress=False)
  config = config_base.load_config(f"{config_path('pretrained')}:lm={out}")
  del config.data.streams["vtp"]
  config.train.steps = 12
  config.train.log_every = 1
  config.train.checkpoint_every = 100
  config.optim.warmup_steps = 0
  config.data.synthetic_examples = 64
  workdir = str(tmp_path / "run")
  summary = trainer.train(config, workdir)
  losses = [summary["losses"][step] for step in sorted(summary["losses"])]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  trained = param_sources.restore_run(config, workdir)[0]
  kind, model = model_for(os.path.join(FIXTURES, "gpt_neox"))
  imported, _ = weights.load_lm(os.path.join(FIXTURES, "gpt_neox"), model, kind)
  for module, name, value in hk.data_structures.traverse(imported):
    got = np.asarray(trained[module][name])
    if "new_token" in module:
      assert not np.array_equal(got, np.asarray(value)), f"{module} did not train"
    else:
      np.testing.assert_array_equal(got, np.asarray(value), err_msg=f"{module}/{name} changed")
  gate = trained["flamingo/language_model/groups/xattn"]["alpha_xattn"]
  assert np.all(np.asarray(gate) != 0)                                  # the Flamingo modules train


# --- the reference itself -----------------------------------------------------------------

@needs_reference("transformers", "torch", script="tests/data/hf_lms/make_fixtures.py")
def test_fixtures_regenerate_with_the_installed_library(tmp_path):
  regenerate_fixture(os.path.join(FIXTURES, "make_fixtures.py"), tmp_path)
  for name in FAMILIES:
    max_diff, agreement = compare_with_reference(str(tmp_path / name))
    assert max_diff < 1e-4 and agreement == 1.0, (name, max_diff)
