"""Few-shot prompts (docs/paper.md §6) and shot selection (random, RICES), by hand."""

import numpy as np
import pytest

from flamingo_jax.evaluation import prompts
from flamingo_jax.evaluation import shots as shots_lib

Example = prompts.Example


def test_caption_prompt_is_figure_8():
  shots = [Example("1", "cat.jpg", references=["A cat wearing sunglasses."]),
           Example("2", "elephants.jpg", references=["Elephants walking in the savanna."])]
  prompt = prompts.build(prompts.CAPTION, shots, Example("q", "query.jpg"))
  assert prompt.text == ("<image>Output: A cat wearing sunglasses.<EOC>"
                         "<image>Output: Elephants walking in the savanna.<EOC><image>Output:")
  assert prompt.media == ["cat.jpg", "elephants.jpg", "query.jpg"]


def test_qa_prompt_and_zero_shot_text_only_examples():
  shot = Example("s", "dog.jpg", {"question": "What is it?"}, ["a dog", "dog"])
  query = Example("q", "cat.jpg", {"question": "What colour is the cat?"})
  assert prompts.build(prompts.QA, [shot], query).text == (
      "<image>Question: What is it? Answer: a dog<EOC>"
      "<image>Question: What colour is the cat? Answer:")
  # Zero-shot: two examples without their images; only the query has one.
  zero = [Example("z1", None, {"question": "Is it red?"}, ["yes"]),
          Example("z2", None, {"question": "How many?"}, ["2"])]
  prompt = prompts.build(prompts.QA, [], query, zero_shot_examples=zero)
  assert prompt.text == ("Question: Is it red? Answer: yes<EOC>Question: How many? Answer: 2<EOC>"
                         "<image>Question: What colour is the cat? Answer:")
  assert prompt.text.count("<image>") == 1 and prompt.media == ["cat.jpg"]
  with pytest.raises(ValueError, match="zero-shot examples are for prompts without shots"):
    prompts.build(prompts.QA, [shot], query, zero_shot_examples=zero)


def test_hateful_memes_prompt_and_bad_examples():
  meme = Example("m", "meme.png", {"text": "look at this"}, ["no"])
  assert prompts.build(prompts.HATEFUL_MEMES, [meme], meme).text == (
      '<image>is an image with written: "look at this" on it. Is it hateful? Answer: no<EOC>'
      '<image>is an image with written: "look at this" on it. Is it hateful? Answer:')
  with pytest.raises(ValueError, match=r"lacks the field\(s\) \['question'\] of the 'qa'"):
    prompts.QA.text(Example("x", None, {}), with_answer=False)
  with pytest.raises(ValueError, match="no reference to use as a shot's answer"):
    prompts.CAPTION.text(Example("x", None), with_answer=True)


def test_generations_are_cut_at_eoc_or_a_new_prompt():
  assert prompts.cut_generation(" two dogs<EOC>Question: x", prompts.QA) == "two dogs"
  assert prompts.cut_generation(" two dogs Question: what", prompts.QA) == "two dogs"
  assert prompts.cut_generation("a cat. Output: a dog", prompts.CAPTION) == "a cat."
  assert prompts.cut_generation("yes Answer: no", prompts.HATEFUL_MEMES) == "yes"


def test_rices_picks_the_most_similar_with_the_closest_last():
  # Support features at known angles to the query (1, 0): cosines 1, 0.8, 0.6, 0, -1.
  support = np.array([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [2.0, 0.0], [0.8, 0.6]])
  query = np.array([[3.0, 0.0], [0.0, -1.0]])
  picks = shots_lib.rices_shots(query, support, shots=3)
  assert picks[0].tolist() == [1, 4, 3]          # cos 0.6, 0.8, 1.0: most similar last
  assert picks[1].tolist() == [4, 3, 2]          # (0, -1): cos -0.6, 0 (tie 2 vs 3: 2 nearer)
  assert shots_lib.rices_shots(query, support, shots=0).shape == (2, 0)
  with pytest.raises(ValueError, match="6 shots asked for but the support set holds 5"):
    shots_lib.rices_shots(query, support, shots=6)


def test_random_shots_depend_only_on_seed_and_query():
  a = shots_lib.random_shots(0, 7, support_size=100, shots=8)
  assert len(set(a.tolist())) == 8 and a.max() < 100
  np.testing.assert_array_equal(a, shots_lib.random_shots(0, 7, 100, 8))
  assert not np.array_equal(a, shots_lib.random_shots(0, 8, 100, 8))
  assert not np.array_equal(a, shots_lib.random_shots(1, 7, 100, 8))
  with pytest.raises(ValueError, match="32 shots asked for but the support set holds 16"):
    shots_lib.random_shots(0, 0, 16, 32)


def test_rices_features_are_pooled_encoder_features_cached_by_fingerprint(tiny_config, tmp_path):
  """The cached features of a support set: the frozen encoder's mean-pooled grid of each
  image as training sees it; an identical query image picks its twin as the closest shot."""
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from flamingo_jax import models  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import preprocessing  # pylint: disable=g-import-not-at-top
  from flamingo_jax.evaluation import features  # pylint: disable=g-import-not-at-top
  from flamingo_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config.model
  rng = np.random.RandomState(0)
  paths = []
  for i in range(5):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(rng.randint(0, 256, (40 + 8 * i, 64, 3)).astype(np.uint8)).save(paths[-1])
  params = models.make_flamingo(cfg).init(
      jax.random.key(0), np.zeros((1, 4), np.int32),
      np.zeros((1, 1, 1, cfg.image_size, cfg.image_size, 3), np.uint8))
  extract = features.FeatureExtractor(engine_lib.Engine(cfg, params), batch_size=4)
  calls = []

  def compute(image_paths):
    calls.append(len(image_paths))
    return extract(image_paths)
  cache = str(tmp_path / "cache" / "support.npy")
  support = features.cached_features(cache, paths, compute, key="run-a")
  assert support.shape[0] == 5 and calls == [5]
  # By hand: the encoder's final grid of image 2, mean-pooled.
  stages = models.make_flamingo_stages(cfg)
  image = preprocessing.load_image(paths[2], cfg.image_size)[None]
  np.testing.assert_allclose(support[2], stages.apply.vision_features(params, None, image)[0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(features.cached_features(cache, paths, compute, key="run-a"),
                                support)
  assert calls == [5]                                   # read from the cache
  features.cached_features(cache, paths, compute, key="run-b")
  assert calls == [5, 5]                                # other parameters: computed again
  query = extract([paths[3]])
  assert shots_lib.rices_shots(query, support, shots=2)[0, -1] == 3
