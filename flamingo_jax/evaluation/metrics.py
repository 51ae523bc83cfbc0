"""Captioning metrics equal to the COCO caption evaluation's (pycocoevalcap 1.2).

    tokens = ptb_tokenize("A man's (red) T-shirt.")   # "a man 's -lrb- red -rrb- t-shirt"
    score, per_key = cider_d({key: [ref tokens, ...]}, {key: candidate tokens})

`ptb_tokenize` stands in for pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 through
Java, lower-cased, then its punctuation tokens dropped) without Java: it gives the same
tokens on tests/data/captions (checked there, and regenerated against the library when it
is installed). Like the library it keeps -lrb-/-rrb- (the punctuation list is upper-case,
the tokens lower-cased) and splits clitics ("is n't", "man 's").

`cider_d` is CIDEr-D as the library computes it: n-grams 1-4, tf-idf with document
frequencies over the references of the whole set, clipped candidate counts, a Gaussian
length penalty (sigma 6) where "length" is the bigram count (the library's quirk), averaged
over n and over references, times 10.
"""

import collections
import math
import re
from typing import Hashable, Mapping, Sequence

_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")      # is n't, ca n't, man 's
# Abbreviations PTB keeps whole (a common subset of CoreNLP's list).
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "inc", "ltd",
                  "co", "mt", "ft", "ave", "gen", "gov", "lt", "sgt", "col", "capt")
_WORD = re.compile(
    r"\d+(?:[.,:/]\d+)+"                                  # 1,000  2.5  3:30  1/2
    r"|(?:[^\W\d_]\.){2,}"                                 # u.s.
    r"|\b(?:" + "|".join(_ABBREVIATIONS) + r")\.(?!\w)"    # mr.  st.
    r"|[^\W_]+(?:[-'&/][^\W_]+)*"                          # t-shirt, don't, at&t, a/b
    r"|\.\.\.|--|[!?]{2,}|\S")                             # ... -- !!! ?! and single characters


def ptb_tokenize(text: str) -> str:
  """Lower-cased PTB tokens joined by spaces, the evaluation's punctuation removed."""
  tokens = []
  for token in _WORD.findall(text.lower()):
    token = _BRACKETS.get(token, token)
    clitic = _CLITIC.match(token)
    tokens += list(clitic.groups()) if clitic else [token]
  return " ".join(t for t in tokens if t not in _DROPPED and t != '"')


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
