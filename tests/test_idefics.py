"""IDEFICS import (weights/idefics.py, `import_weights --kind=idefics`, configs/idefics.py):
logits equal transformers' IdeficsForVisionText2Text within 1e-4 (float32) on ragged
interleaved batches, with every option of its config on (options/) and off (plain/); greedy
tokens equal its `generate`; its processor's image mask is our φ; the trainable set is what
IDEFICS trains. Fixtures: tests/data/idefics/make_fixtures.py (transformers' own random
models); regenerated and compared when transformers is installed."""

import json
import os

import haiku as hk
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, config_path, needs_reference, regenerate_fixture
from flamingo_jax import config_base
from flamingo_jax.data import tokenizer as tok
from flamingo_jax import inference
from flamingo_jax import models
from flamingo_jax.training import param_sources
from flamingo_jax import weights
from flamingo_jax.weights import imports
from flamingo_jax.weights import parity

FIXTURES = os.path.join(REPO, "tests", "data", "idefics")
VARIANTS = ("options", "plain")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("idefics")
  return {name: (imports.run_idefics(os.path.join(FIXTURES, name), str(root / name),
                                    progress=False), str(root / name)) for name in VARIANTS}


def _config(out: str):
  return config_base.load_config(f"{config_path('idefics')}:{out}")


def _reference(name: str) -> dict:
  return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


def _check(name: str, out: str, **overrides):
  config = _config(out)
  config.model.xattn.update(overrides)
  ref = _reference(name)
  logits = np.where(ref["attention_mask"][..., None], ref["logits"], np.nan)   # padding: NaN
  params, _ = param_sources.load(config, out)
  return parity.check_logits(config.model, params, ref["input_ids"], ref["media"], logits)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_imported_idefics_gives_its_logits(imported, name):
  """Rows with text before the first image, two images in a row, an EOS between images
  (after it, no image until the next): every real token within 1e-4."""
  report, out = imported[name]
  assert (report["image_token_id"], report["eoc_token_id"]) == (301, 0)
  check = _check(name, out)
  assert check["ok"] and check["max_abs_diff"] < 1e-4, check
  assert check["argmax_agreement"] == 1.0
  with open(os.path.join(out, "model.json")) as f:
    fields = json.load(f)
  assert fields["new_token_ids"] == [300, 301] and fields["vocab_size"] == 384
  expected = {"options": dict(gate="vector", qk_norm="rms", every=2, kind="perceiver",
                              resampler_qk="layer", act="gelu"),
              "plain": dict(gate="scalar", qk_norm="", every=1, kind="none", resampler_qk=None,
                            act="quick_gelu")}[name]
  x, r = fields["xattn"], fields["resampler"]
  assert (x["gate"], x["qk_norm"], x["every"], x["norm"], x["ffw"], r["kind"],
          r.get("qk_norm"), fields["vision"]["vit"]["activation"],
          fields["vision"]["vit"]["output"]) == (
              expected["gate"], expected["qk_norm"], expected["every"], "rms", "gated",
              expected["kind"], expected["resampler_qk"], expected["act"], "tokens")


def test_the_end_of_document_rule_is_what_makes_row_two_equal(imported):
  """Without the processor's rule (no image after EOS until the next <image>) the tokens
  after row 2's EOS see its first image and their logits differ."""
  _, out = imported["plain"]
  check = _check("plain", out, no_media_after_id=-1)
  assert check["max_abs_diff"] > 1e-3 and check["worst_position"][0] == 2, check


def test_our_media_index_is_the_idefics_processors_image_mask():
  ref = _reference("options")
  phi = models.media_positions(jnp.asarray(ref["input_ids"]), 301, 0)
  ours = (np.asarray(phi)[..., None] == np.arange(1, 4)).astype(np.int64)   # [B, L, N]
  np.testing.assert_array_equal(ours, ref["image_attention_mask"])


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_tokens_equal_transformers_generate(imported, name):
  _, out = imported[name]
  config = _config(out)
  params, _ = param_sources.load(config, out)
  ref = _reference(name)
  n = int(ref["attention_mask"][0].sum())
  engine = inference.Engine(config.model, params, max_slots=64)
  result = inference.generate(engine, [ref["input_ids"][0, :n].tolist()], ref["media"][:1],
                              max_new_tokens=20, stop_ids=(0,))
  assert result[0][0].tokens == ref["generated"][0].tolist()


def test_its_tokenizer_places_images_as_its_processor_does(imported):
  _, out = imported["options"]
  tokenizer = tok.load(os.path.join(out, "tokenizer.json"))
  assert tokenizer.special.image == 301 and tokenizer.special.image_around == 300
  ids = tok.encode_with_markers("<image>a<image><image>b", tokenizer)
  a, b = tokenizer.encode("a"), tokenizer.encode("b")
  assert ids == [0, 300, 301, 300, *a, 300, 301, 300, 301, 300, *b]


def test_the_trainable_set_is_what_idefics_trains(imported):
  """IDEFICS trains its perceiver, its gated layers and the decoupled extra rows (embedding
  and lm_head); its LM, vision tower and base tables stay frozen: so do ours."""
  _, out = imported["options"]
  config = _config(out)
  params, from_seed = param_sources.load(config, out)
  assert not from_seed
  trainable, frozen = hk.data_structures.partition(
      lambda module, name, value: models.is_trainable(module), params)
  ckpt = dict(weights.SafetensorsCheckpoint(os.path.join(FIXTURES, "options")))
  theirs = sum(v.size for k, v in ckpt.items()
               if k.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers."))
               or "additional" in k)
  size = lambda tree: sum(int(np.prod(v.shape)) for _, _, v in hk.data_structures.traverse(tree))
  assert size(trainable) == theirs
  lm = "flamingo/language_model"
  np.testing.assert_array_equal(trainable[f"{lm}/new_token_embed"]["embeddings"],
                                ckpt["model.embed_tokens.additional_embedding.weight"])
  np.testing.assert_array_equal(trainable[f"{lm}/new_token_unembed"]["w"],
                                ckpt["lm_head.additional_fc.weight"].T)
  assert {models.component_of(m) for m in frozen} == {"lm", "vision"}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  out = tmp_path / "out"

  def error(source) -> str:
    with pytest.raises(weights.CheckpointError) as info:
      imports.run_idefics(str(source), str(out), progress=False)
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    assert "\n" not in str(info.value)
    return str(info.value)
  assert "not IDEFICS" in error(os.path.join(REPO, "tests", "data", "hf_lms", "llama"))
  edited = tmp_path / "edited"
  shutil.copytree(os.path.join(FIXTURES, "options"), edited)
  with open(edited / "config.json") as f:
    hf = json.load(f)
  with open(edited / "config.json", "w") as f:
    json.dump(hf | {"cross_layer_interval": 3}, f)
  assert "cross_layer_interval=3 does not divide num_hidden_layers=4" in error(edited)
  with open(edited / "config.json", "w") as f:
    json.dump(hf | {"tie_word_embeddings": True}, f)
  assert "tie_word_embeddings=True is not supported" in error(edited)
  with open(edited / "config.json", "w") as f:
    json.dump(hf | {"use_resampler": False}, f)
  assert "use_resampler is false but it holds model.perceiver_resampler" in error(edited)


@pytest.mark.slow
def test_fine_tuning_an_import_trains_what_idefics_trains(imported, tmp_path):
  """Two steps of `idefics.py:IMPORT` on synthetic data from the import's parameters: the
  LM and the vision tower bit-identical, the perceiver, gated layers and extra rows moved."""
  from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
  _, out = imported["options"]
  config = _config(out)
  config.train.steps, config.train.log_every = 2, 1
  config.data.synthetic_examples = 16
  for stream in config.data.streams.values():
    stream.batch_size = 8                            # one row per fake device
  config.data.synthetic_image_size = 64
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir)
  before, _ = param_sources.load(config, out)
  after = param_sources.restore_run(param_sources.run_config(workdir), workdir)[0]
  moved = {m for m, n, v in hk.data_structures.traverse(after)
           if not np.array_equal(np.asarray(v), np.asarray(before[m][n]))}
  assert {models.component_of(m) for m in moved} == {"resampler", "xattn", "lm"}
  assert all(models.is_trainable(m) for m in moved)                      # lm: the extra rows
  assert any("new_token" in m for m in moved)


@needs_reference("transformers", "torch", script="tests/data/idefics/make_fixtures.py")
def test_fixtures_regenerate_with_the_installed_library(tmp_path):
  regenerate_fixture(os.path.join(FIXTURES, "make_fixtures.py"), tmp_path)
  for name in VARIANTS:
    fresh, kept = dict(np.load(tmp_path / name / "reference.npz")), _reference(name)
    for key in kept:
      np.testing.assert_allclose(fresh[key], kept[key], rtol=1e-6, atol=1e-6)
