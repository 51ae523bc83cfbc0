"""Writes cider_fixture.json: captions, pycocoevalcap 1.2's PTB tokens of each, and its CIDEr-D
scores on those tokens. Run in the reference venv (docs/benchmarks.md, "The reference environment") with
`pip install pycocoevalcap==1.2` and Java on the PATH:

    $REF tests/data/captions/make_fixtures.py [OUTPUT.json]
"""

import json
import os
import sys

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

REFERENCES = {
    "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.",
          "Man on a surfboard riding a wave!", "A person surfing in the ocean.",
          "A surfer in a black wet-suit is riding a wave"],
    "2": ["Two dogs playing with a frisbee in the park.", "The dogs' frisbee is red.",
          "two dogs are running on the grass", "A couple of dogs chase a red disc",
          "Dogs (a brown one and a white one) play outside."],
    "3": ["A kitchen with a stove, a sink and a refrigerator.", "A clean kitchen; it's white.",
          "The kitchen isn't large but it has 1,000 things", "A small kitchen, with wooden cabinets",
          "A \"modern\" kitchen -- nothing on the counters."],
    "4": ["A plate of food with broccoli and rice.", "Rice, broccoli, and 2.5 pieces of chicken.",
          "Someone's dinner: chicken, rice & greens", "A meal on a white plate...",
          "Food on a plate that can't be finished"],
    "5": ["A red double-decker bus on a city street.", "A bus in the U.S. that won't stop",
          "The big red bus is parked.", "A tour bus driving down the road",
          "Double decker bus [red] near a building"],
}
CANDIDATES = {
    "1": "A man riding a wave on a surfboard.",
    "2": "Two dogs play with a red frisbee.",
    "3": "A kitchen with a stove and a sink.",
    "4": "A plate of food.",
    "5": "A red bus on a street, isn't it?",
}

# Harder cases for the tokenizer alone: clitics, symbols, abbreviations, repeated
# punctuation, non-ASCII letters.
TOKENIZER_CASES = [
    "I'm here and they'll go, we've seen it.", "An e-mail costs $5 (50% off) at 3:30.",
    "a/b test by Mr. Smith in St. Louis.", "A 'quoted' word and O'Neil's hat", "Hello!!! What?!",
    "café au lait", "Ein Mädchen läuft.", "dogs' bowls", "#1 fan @ home",
]


def main(output):
  tokenizer = PTBTokenizer()
  refs = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
  cands = tokenizer.tokenize({k: [{"caption": c}] for k, c in CANDIDATES.items()})
  score, scores = Cider().compute_score(refs, cands)
  cases = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(TOKENIZER_CASES)})
  fixture = {"references": REFERENCES, "candidates": CANDIDATES,
             "tokenized_references": refs, "tokenized_candidates": {k: v[0] for k, v in cands.items()},
             "cider_d": float(score), "cider_d_per_key": dict(zip(refs, map(float, scores))),
             "tokenizer_cases": TOKENIZER_CASES,
             "tokenized_cases": [cases[i][0] for i in range(len(TOKENIZER_CASES))]}
  with open(output, "w") as f:
    json.dump(fixture, f, indent=1, sort_keys=True)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else
       os.path.join(os.path.dirname(os.path.abspath(__file__)), "cider_fixture.json"))
