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
