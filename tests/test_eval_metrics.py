"""Captioning metrics equal pycocoevalcap 1.2 (tokens and CIDEr-D), on fixtures it made."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from flamingo_jax.evaluation import metrics

FIXTURES = os.path.join(REPO, "tests", "data", "captions")


def fixture():
  with open(os.path.join(FIXTURES, "cider_fixture.json")) as f:
    return json.load(f)


def test_ptb_tokens_equal_the_java_tokenizers():
  data = fixture()
  for key, captions in data["references"].items():
    assert [metrics.ptb_tokenize(c) for c in captions] == data["tokenized_references"][key]
  for key, caption in data["candidates"].items():
    assert metrics.ptb_tokenize(caption) == data["tokenized_candidates"][key]
  assert [metrics.ptb_tokenize(c) for c in data["tokenizer_cases"]] == data["tokenized_cases"]


def test_cider_d_equals_pycocoevalcap():
  data = fixture()
  score, per_key = metrics.cider_d(data["tokenized_references"], data["tokenized_candidates"])
  assert score == pytest.approx(data["cider_d"], abs=1e-12)
  for key, value in data["cider_d_per_key"].items():
    assert per_key[key] == pytest.approx(value, abs=1e-12), key


def test_cider_d_by_hand_and_bad_input():
  # One key: every n-gram occurs in the only document, so idf = log(1) - log(1) = 0 and every
  # vector is zero: CIDEr-D of any candidate is 0 (the library's behaviour on one image).
  assert metrics.cider_d({"a": ["a cat"]}, {"a": "a cat"}) == (0.0, {"a": 0.0})
  # Two keys, exact matches of single references: per n, the cosine is 1 wherever the n-gram
  # vectors are non-zero (n <= 2 for two-word captions), so each score is 10 * 2 / 4 = 5.
  score, per_key = metrics.cider_d({"a": ["a cat"], "b": ["two dogs"]},
                                   {"a": "a cat", "b": "two dogs"})
  assert per_key == {"a": pytest.approx(5.0), "b": pytest.approx(5.0)} and score == pytest.approx(5.0)
  with pytest.raises(ValueError, match="differ in keys"):
    metrics.cider_d({"a": ["x"]}, {"b": "x"})
  with pytest.raises(ValueError, match="at least one reference"):
    metrics.cider_d({"a": []}, {"a": "x"})


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None or not shutil.which("java"),
                    reason="needs pycocoevalcap 1.2 and Java (the reference venv)")
def test_fixture_regenerates_with_the_installed_library(tmp_path):
  out = tmp_path / "fixture.json"
  subprocess.run([sys.executable, os.path.join(FIXTURES, "make_fixtures.py"), str(out)],
                 check=True, capture_output=True)
  assert json.loads(out.read_text()) == fixture()


VQA_FIXTURES = os.path.join(REPO, "tests", "data", "vqa")


def vqa_fixture():
  with open(os.path.join(VQA_FIXTURES, "vqa_fixture.json")) as f:
    return json.load(f)


def test_vqa_answer_normalisation_equals_the_evaluation_script():
  for text, expected in vqa_fixture()["normalized"].items():
    punctuation = metrics.vqa_punctuation(text)
    assert punctuation == expected["punctuation"], text
    assert metrics.vqa_digits_articles(punctuation) == expected["digits_articles"], text


def test_vqa_accuracy_with_full_normalisation_equals_openflamingos_script():
  data = vqa_fixture()
  ours = {str(q["question_id"]): metrics.vqa_accuracy(q["prediction"], q["answers"],
                                                      normalize_answers=True)
          for q in data["questions"]}
  assert {q: round(100 * a, 2) for q, a in ours.items()} == data["openflamingo_accuracy"]
  assert round(100 * sum(ours.values()) / len(ours), 2) == data["openflamingo_overall"]


@pytest.mark.parametrize("question_id,expected", [
    # 3 x "2", 2 x "two", 5 x "3"; "Two" -> "2". The answers disagree, so they only lose
    # punctuation: "two" stays, 3 match. Leaving out a match: 2/3 (3 ways), else 1 (7 ways).
    (1, 0.9),
    (2, 1.0),    # "Red." -> "red"; ten "red"
    (3, 1.0),    # 6 x "apple" match; "an apple" keeps its article (no digit/article step)
    (4, 0.6),    # 2 of 10 match: (2 x 1/3 + 8 x 2/3) / 10
    (6, 0.0),    # ten "none" are not normalised (they agree): "0" matches none of them
    (8, 0.3),    # 1 of 10: 0 when it is left out, else 1/3
    (10, 0.0),   # ten "1,000" kept as written; "1000" does not match
])
def test_vqa_accuracy_follows_the_official_script_by_hand(question_id, expected):
  question = next(q for q in vqa_fixture()["questions"] if q["question_id"] == question_id)
  got = metrics.vqa_accuracy(question["prediction"], question["answers"])
  assert got == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_bad_input():
  with pytest.raises(ValueError, match="at least one human answer"):
    metrics.vqa_accuracy("yes", [])


@pytest.mark.skipif(importlib.util.find_spec("open_flamingo") is None,
                    reason="needs open_flamingo 2.0.1 (the reference venv)")
def test_vqa_fixture_regenerates_with_the_installed_script(tmp_path):
  out = tmp_path / "fixture.json"
  subprocess.run([sys.executable, os.path.join(VQA_FIXTURES, "make_fixtures.py"), str(out)],
                 check=True, capture_output=True)
  assert json.loads(out.read_text()) == vqa_fixture()


def test_roc_auc_and_top1_by_hand():
  # Positives 0.9, 0.4; negatives 0.5, 0.1: of the 4 pairs, 3 are ordered right.
  assert metrics.roc_auc([0.9, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == 0.75
  # A tied positive/negative pair counts one half: 3.5 of the 4 pairs.
  assert metrics.roc_auc([0.7, 0.7, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
  assert metrics.roc_auc([3, 2, 1], [1, 0, 0]) == 1.0 and metrics.roc_auc([1, 2], [1, 0]) == 0.0
  with pytest.raises(ValueError, match="both positive and negative"):
    metrics.roc_auc([0.1, 0.2], [1, 1])
  assert metrics.top1_accuracy(["cat", "dog", "cow"], ["cat", "cow", "cow"]) == 2 / 3
  with pytest.raises(ValueError, match="2 predictions for 1 labels"):
    metrics.top1_accuracy(["a", "b"], ["a"])
