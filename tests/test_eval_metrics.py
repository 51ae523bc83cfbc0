"""Captioning metrics equal pycocoevalcap 1.2 (tokens, corpus CIDEr-D and per-image scores):
on committed fixtures it made, and on captions generated here from every kind of text that
tokenizers disagree on, against the installed library itself (a dev dependency: its jar is our
tokenizer, and its Python scorers are the oracle)."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from conftest import REPO
from flamingo_jax.evaluation import harness as harness_lib
from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation import tasks

FIXTURES = os.path.join(REPO, "tests", "data", "captions")


def fixture():
  with open(os.path.join(FIXTURES, "cider_fixture.json")) as f:
    return json.load(f)


def test_ptb_tokens_equal_the_java_tokenizers():
  data = fixture()
  assert metrics.ptb_tokenize_sets(data["references"]) == data["tokenized_references"]
  assert {k: v[0] for k, v in metrics.ptb_tokenize_sets(
      {k: [c] for k, c in data["candidates"].items()}).items()} == data["tokenized_candidates"]
  assert metrics.ptb_tokenize(data["tokenizer_cases"]) == data["tokenized_cases"]


# What tokenizers split differently: hyphens and number words, inner apostrophes and clitics,
# numbers with separators, brackets, quotes of every kind, abbreviations, symbols, unicode
# letters, punctuation and spaces, and control characters a caption may carry.
_PIECES = [
    "a", "man", "the", "dogs", "riding", "red", "bus", "on", "of", "with", "and", "is",
    "twenty-one", "3-year-old", "x-ray", "well-known", "e-mail", "--", "-", "—", "–",
    "don't", "can't", "won't", "man's", "dogs'", "O'Neil's", "rock'n'roll", "y'all", "'90s",
    "it's", "I'm", "they'll", "we've", "ma'am", "o'clock",
    "1,000", "2.5", "3:30", "1/2", "$5", "50%", "#1", "10,000,000", "1.5.2", "4x4",
    "(", ")", "[", "]", "{", "}", "(red)", "[sic]", "{x}",
    "\"", "'", "``", "''", "“", "”", "‘", "’", "«", "»", "\"quoted\"", "'single'",
    "Mr.", "Dr.", "U.S.", "etc.", "e.g.", "St.", "a.m.",
    "@", "&", "*", "/", "+", "=", "<", ">", "|", "~", "^", "at&t", "a/b", "www.example.com",
    "user@mail.org", ":)", "#hashtag",
    "café", "naïve", "Ein", "Mädchen", "läuft", "東京", "🙂", "Ωmega", "ﬁne", "İstanbul",
    ".", ",", ";", ":", "!", "?", "...", "…", "!!!", "?!", ".,", "\t", "\u00a0", "  ",
]


def _captions(rng: random.Random, count: int) -> list[str]:
  out = []
  for _ in range(count):
    words = [rng.choice(_PIECES) for _ in range(rng.randint(1, 14))]
    glue = [rng.choice([" ", " ", " ", ""]) for _ in words]
    out.append("".join(w + g for w, g in zip(words, glue)).strip(" ") or "a")
  return out


def test_tokens_and_cider_d_equal_pycocoevalcap_on_generated_captions():
  rng = random.Random(20261204)
  references = {f"img{i}": _captions(rng, rng.randint(1, 5)) for i in range(60)}
  candidates = {k: _captions(rng, 1)[0] for k in references}
  candidates["img0"] = "A caption\nbroken over two lines"       # newlines become spaces
  references["img1"].append("")                                  # an empty reference
  theirs = PTBTokenizer()
  their_refs = theirs.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
  their_cands = theirs.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
  our_refs = metrics.ptb_tokenize_sets(references)
  our_cands = metrics.ptb_tokenize_sets({k: [c] for k, c in candidates.items()})
  assert our_refs == their_refs
  assert our_cands == their_cands
  their_score, their_scores = Cider().compute_score(their_refs, their_cands)
  score, per_key = metrics.cider_d(our_refs, {k: v[0] for k, v in our_cands.items()})
  assert score == pytest.approx(float(their_score), abs=1e-12)
  assert [per_key[k] for k in their_refs] == pytest.approx(list(map(float, their_scores)),
                                                           abs=1e-12)


def test_the_coco_metric_of_stored_rows_equals_the_librarys_pipeline():
  """`evaluate`'s figure for a captioning task (score_rows): 30 outputs with everyday
  punctuation, as COCOEvalCap computes it (references and outputs tokenized apart, CIDEr-D
  x 100)."""
  rng = random.Random(7)
  everyday = ["A man's dog, running.", "Two kids (brothers) play soccer!",
              "A 3-year-old's birthday cake; it's pink.", "The U.S. flag -- waving.",
              "A \"vintage\" car... parked", "Rock'n'roll band on stage?",
              "A well-known twenty-one-story building", "Cats' toys: a ball & a mouse"]
  rows = [{"id": i, "output": rng.choice(everyday),
           "reference": [rng.choice(everyday) for _ in range(5)]} for i in range(30)]
  value = harness_lib.score_rows(tasks.get("coco"), rows, [])
  tok = PTBTokenizer()
  gts = tok.tokenize({r["id"]: [{"caption": c} for c in r["reference"]] for r in rows})
  res = tok.tokenize({r["id"]: [{"caption": r["output"]}] for r in rows})
  assert value == pytest.approx(100.0 * Cider().compute_score(gts, res)[0], abs=1e-9)


def test_a_missing_java_or_jar_is_one_line_saying_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(metrics.TokenizerUnavailableError,
                     match="no `java` is on the PATH: install a Java runtime"):
    metrics.ptb_tokenize(["a cat"])
  monkeypatch.undo()
  monkeypatch.setenv("FLAMINGO_PTB_JAR", str(tmp_path / "nope.jar"))
  with pytest.raises(metrics.TokenizerUnavailableError, match="nope.jar does not exist"):
    metrics.check_ptb_tokenizer()
  monkeypatch.delenv("FLAMINGO_PTB_JAR")
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(metrics.TokenizerUnavailableError,
                     match=r"pip install 'flamingo_jax\[coco\]'"):
    metrics.check_ptb_tokenizer()


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
