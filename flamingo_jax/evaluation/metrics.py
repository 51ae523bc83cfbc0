"""Evaluation metrics equal to the reference implementations': captions (pycocoevalcap 1.2)
and VQA accuracy (the official VQA evaluation).

    tokens = ptb_tokenize(["A man's (red) T-shirt."])  # ["a man 's red t-shirt"]
    score, per_key = cider_d({key: [ref tokens, ...]}, {key: candidate tokens})

`ptb_tokenize` is pycocoevalcap's PTBTokenizer step by step: the captions, each on one line,
through Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` in Java, then its
punctuation tokens dropped. No Python tokenizer gives its tokens on every input (hyphenated
number words, inner apostrophes, unicode: CoreNLP's lexer has hundreds of rules), and CIDEr
moves with every token, so the Java tokenizer is required: a Java runtime on the PATH and the
jar that pycocoevalcap 1.2 ships (`pip install 'flamingo_jax[coco]'`), or the jar named by
$FLAMINGO_PTB_JAR. `check_ptb_tokenizer()` says in one line what is missing.

`cider_d` is CIDEr-D as the library computes it: n-grams 1-4, tf-idf with document
frequencies over the references of the whole set, clipped candidate counts, a Gaussian
length penalty (sigma 6) where "length" is the bigram count (the library's quirk), averaged
over n and over references, times 10.

    vqa_accuracy("Two dogs.", ten_human_answers)      # in [0, 1]

`vqa_accuracy` is the official VQA evaluation's per-question accuracy (GT-Vision-Lab's
vqaEval.py, used for VQAv2, OKVQA, VizWiz and TextVQA): its answer normalisation with its
quirks (tests/data/vqa: equal to the script's functions, as OpenFlamingo 2.0.1 ships them)
and the average over the 10 choose 9 annotator subsets.
"""

import collections
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Hashable, Mapping, Sequence

from absl import logging

# pycocoevalcap's PUNCTUATIONS: tokens dropped after tokenizing (upper-case brackets: the
# tokens are lower-cased, so "-lrb-" stays, as in the library).
_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
            "-", "--", "...", ";"}
PTB_JAR = "stanford-corenlp-3.4.1.jar"
_PTB_COMMAND = ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]


class TokenizerUnavailableError(RuntimeError):
  """Java or the CoreNLP jar is missing; the message says how to install them."""


def ptb_jar() -> str:
  """The CoreNLP 3.4.1 jar: $FLAMINGO_PTB_JAR, else the one pycocoevalcap 1.2 installs."""
  named = os.environ.get("FLAMINGO_PTB_JAR", "")
  if named:
    if not os.path.isfile(named):
      raise TokenizerUnavailableError(f"FLAMINGO_PTB_JAR={named} does not exist")
    return named
  spec = importlib.util.find_spec("pycocoevalcap")          # its files only, never its code
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, "tokenizer", PTB_JAR)
    if os.path.isfile(path):
      return path
  raise TokenizerUnavailableError(
      f"CIDEr needs pycocoevalcap's PTB tokenizer ({PTB_JAR}): pip install "
      f"'flamingo_jax[coco]' (pycocoevalcap==1.2 ships it) or set FLAMINGO_PTB_JAR")


def check_ptb_tokenizer() -> str:
  """The jar, once Java and the jar are known to be there; TokenizerUnavailableError naming
  what is missing and how to install it otherwise."""
  if shutil.which("java") is None:
    raise TokenizerUnavailableError(
        "CIDEr needs Java for pycocoevalcap's PTB tokenizer (Stanford CoreNLP 3.4.1) and no "
        "`java` is on the PATH: install a Java runtime (Debian/Ubuntu: apt-get install "
        "default-jre-headless)")
  return ptb_jar()


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
  """pycocoevalcap's PTBTokenizer.tokenize on `captions` in order: lower-cased PTB tokens
  joined by spaces, its punctuation dropped. One Java call for all of them."""
  if not captions:
    return []
  jar = check_ptb_tokenizer()
  # As the library: newlines inside a caption become spaces, one caption per line.
  text = "\n".join(c.replace("\n", " ") for c in captions)
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "captions.txt")
    with open(path, "wb") as f:
      f.write(text.encode())
    result = subprocess.run(["java", "-cp", jar, *_PTB_COMMAND, path], capture_output=True)
  if result.returncode != 0:
    raise RuntimeError(f"the PTB tokenizer failed ({result.returncode}): "
                       f"{result.stderr.decode(errors='replace').strip()[-500:]}")
  lines = result.stdout.decode().split("\n")
  if not len(captions) <= len(lines) <= len(captions) + 1:
    # Java breaks lines at characters Python's join does not (\r, U+2028, ...): the library
    # then pairs captions with the wrong lines, and so do we, to give its numbers. (One line
    # fewer is an empty last caption: Java writes no line for it, and the pairing holds.)
    logging.warning("the PTB tokenizer gave %d lines for %d captions; pairing them in order "
                    "as pycocoevalcap does", len(lines) - 1, len(captions))
  tokens = [" ".join(w for w in line.rstrip().split(" ") if w not in _DROPPED)
            for line, _ in zip(lines, captions)]
  return tokens


def ptb_tokenize_sets(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
  """{key: [tokens of each caption]} for {key: [captions]}, in one Java call (the library's
  `tokenize` of a gts or res dict). A key whose line the tokenizer did not give is left out,
  as the library leaves it out."""
  keys = [k for k, v in captions.items() for _ in v]
  out = {}
  for key, tokens in zip(keys, ptb_tokenize([c for v in captions.values() for c in v])):
    out.setdefault(key, []).append(tokens)
  return out


def _ngrams(sentence: str, n: int) -> collections.Counter:
  words = sentence.split()
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                             for i in range(len(words) - k + 1))


def cider_d(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
            n: int = 4, sigma: float = 6.0) -> tuple[float, dict]:
  """(corpus CIDEr-D, {key: CIDEr-D}) of tokenized candidates against tokenized references."""
  if set(references) != set(candidates):
    raise ValueError(f"references and candidates differ in keys: "
                     f"{sorted(set(references) ^ set(candidates), key=str)[:5]}")
  if any(not refs for refs in references.values()):
    raise ValueError("every key needs at least one reference")
  keys = list(references)
  ref_counts = {k: [_ngrams(r, n) for r in references[k]] for k in keys}
  document_frequency = collections.Counter(
      gram for k in keys for gram in set().union(*ref_counts[k]))
  log_documents = math.log(len(keys))

  def vector(counts):
    vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
    for gram, tf in counts.items():
      order = len(gram) - 1
      vec[order][gram] = tf * (log_documents - math.log(max(1.0, document_frequency[gram])))
      norm[order] += vec[order][gram] ** 2
      if order == 1:
        length += tf
    return vec, [math.sqrt(x) for x in norm], length

  scores = {}
  for k in keys:
    vec, norm, length = vector(_ngrams(candidates[k], n))
    total = [0.0] * n
    for ref in ref_counts[k]:
      vec_ref, norm_ref, length_ref = vector(ref)
      penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma ** 2))
      for order in range(n):
        value = sum(min(w, vec_ref[order].get(g, 0.0)) * vec_ref[order].get(g, 0.0)
                    for g, w in vec[order].items())
        if norm[order] and norm_ref[order]:
          value /= norm[order] * norm_ref[order]
        total[order] += value * penalty
    scores[k] = sum(total) / n / len(ref_counts[k]) * 10.0
  return sum(scores.values()) / len(scores), scores


# -- VQA accuracy (the official VQA evaluation, GT-Vision-Lab's vqaEval.py) -------------------

# The evaluation's contraction table, as "written=canonical" pairs (its quirks kept:
# "somebody'd" becomes "somebodyd"; capitalised keys never match after lower-casing).
_CONTRACTIONS = dict(pair.split("=", 1) for pair in (
    "'ow'sat='ow's'at 'ows'at='ow's'at I'dve=I'd've Id've=I'd've Im=I'm Ive=I've aint=ain't "
    "arent=aren't cant=can't couldn'tve=couldn't've couldnt=couldn't couldnt've=couldn't've "
    "couldve=could've didnt=didn't doesnt=doesn't dont=don't hadn'tve=hadn't've hadnt=hadn't "
    "hadnt've=hadn't've hasnt=hasn't havent=haven't he'dve=he'd've hed=he'd hed've=he'd've "
    "hes=he's howd=how'd howll=how'll hows=how's isnt=isn't it'dve=it'd've itd=it'd "
    "itd've=it'd've itll=it'll let's=let's maam=ma'am mightn'tve=mightn't've mightnt=mightn't "
    "mightnt've=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't "
    "notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at shant=shan't she'dve=she'd've "
    "she's=she's shed've=she'd've shouldn'tve=shouldn't've shouldnt=shouldn't "
    "shouldnt've=shouldn't've shouldve=should've somebody'd=somebodyd somebody'dve=somebody'd've "
    "somebodyd've=somebody'd've somebodyll=somebody'll somebodys=somebody's "
    "someone'dve=someone'd've someoned=someone'd someoned've=someone'd've someonell=someone'll "
    "someones=someone's something'dve=something'd've somethingd=something'd "
    "somethingd've=something'd've somethingll=something'll thats=that's there'dve=there'd've "
    "thered=there'd thered've=there'd've therere=there're theres=there's they'dve=they'd've "
    "theyd=they'd theyd've=they'd've theyll=they'll theyre=they're theyve=they've twas='twas "
    "wasnt=wasn't we'dve=we'd've wed've=we'd've werent=weren't weve=we've whatll=what'll "
    "whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's "
    "whereve=where've who'dve=who'd've whod=who'd whod've=who'd've wholl=who'll whos=who's "
    "whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldn'tve=wouldn't've "
    "wouldnt=wouldn't wouldnt've=wouldn't've wouldve=would've y'all'dve=y'all'd've "
    "y'alld've=y'all'd've y'allll=y'all'll yall=y'all yall'd've=y'all'd've yall'll=y'all'll "
    "you'dve=you'd've youd=you'd youd've=you'd've youll=you'll youre=you're youve=you've"
).split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# A period not followed by a digit (the evaluation's lookbehind is written as a lookahead,
# "(?!<=", so a period after a digit goes too; it passes re.UNICODE as the count: at most
# 32 periods are removed).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
  """The evaluation's processPunctuation: each mark is deleted where it touches a space (or
  anywhere, once a digit,digit comma occurs in the text), else replaced by a space."""
  out = text
  for mark in _PUNCTUATION:
    if mark + " " in text or " " + mark in text or _DIGIT_COMMA.search(text):
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD.sub("", out, count=32)


def vqa_digits_articles(text: str) -> str:
  """The evaluation's processDigitArticle: lower-case words, number words to digits, articles
  dropped, contractions restored."""
  words = [_NUMBERS.get(word, word) for word in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str],
                 normalize_answers: bool = False) -> float:
  """One question's accuracy in [0, 1], as the official evaluation computes it.

  The prediction is normalised (whitespace, punctuation, digits, articles, contractions);
  the human answers only get the punctuation step, and only when they disagree among
  themselves (the official script's rule). `normalize_answers=True` normalises the answers
  fully, always, as OpenFlamingo's copy of the script does (to compare with its numbers).
  Then min(1, matches / 3) averaged over the leave-one-annotator-out subsets (10 choose 9).
  """
  def clean(text):
    return text.replace("\n", " ").replace("\t", " ").strip()
  answers = [clean(a) for a in answers]
  if not answers:
    raise ValueError("a VQA question needs at least one human answer")
  prediction = vqa_digits_articles(vqa_punctuation(clean(prediction)))
  if normalize_answers:
    answers = [vqa_digits_articles(vqa_punctuation(a)) for a in answers]
  elif len(set(answers)) > 1:
    answers = [vqa_punctuation(a) for a in answers]
  matches = sum(a == prediction for a in answers)
  # Leaving out a matching answer leaves matches - 1, any other leaves matches.
  left_out = [matches - (a == prediction) for a in answers]
  return sum(min(1.0, m / 3) for m in left_out) / len(answers)


# -- close-ended tasks ------------------------------------------------------------------------

def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
  """Area under the ROC curve (HatefulMemes): the probability that a random positive scores
  above a random negative, ties counting one half (as sklearn's roc_auc_score)."""
  if len(scores) != len(labels):
    raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
  if any(label not in (0, 1) for label in labels):
    raise ValueError("labels must be 0 or 1")
  positives = sum(labels)
  negatives = len(labels) - positives
  if not positives or not negatives:
    raise ValueError("ROC AUC needs both positive and negative examples")
  # Mann-Whitney U from average ranks (1-based; tied scores share the mean of their ranks).
  order = sorted(range(len(scores)), key=lambda i: scores[i])
  ranks = [0.0] * len(scores)
  start = 0
  while start < len(order):
    end = start
    while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
      end += 1
    for i in order[start:end + 1]:
      ranks[i] = (start + end) / 2 + 1
    start = end + 1
  positive_rank_sum = sum(r for r, label in zip(ranks, labels) if label)
  return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def normalize_short_answer(text: str) -> str:
  """A generated short answer (video QA top-1): lower case, outer spaces and final period off."""
  return text.strip().lower().rstrip(".").strip()


def top1_accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
  """Fraction of exact matches (classification by scoring every class name; video QA)."""
  if len(predictions) != len(labels) or not labels:
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  return sum(p == label for p, label in zip(predictions, labels)) / len(labels)
