"""Writes vqa_fixture.json from the VQA evaluation script as OpenFlamingo 2.0.1 ships it
(open_flamingo/eval/vqa_metric.py, a copy of the official vqaEval.py whose normalisation
functions are unchanged; its evaluate() normalises the human answers always, which
`metrics.vqa_accuracy(..., normalize_answers=True)` reproduces).

    $REF -m pip install --no-deps open_flamingo==2.0.1
    $REF tests/data/vqa/make_fixtures.py [OUT.json]    # default: vqa_fixture.json here

The module is loaded from its file: the package's __init__ needs torch and open_clip.
"""

import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Strings that reach every branch of the normalisation: marks touching spaces or not, a
# digit,digit comma anywhere, periods before/after digits, number words, articles,
# contractions (lower-cased first), whitespace.
TEXTS = [
    "yes", "Yes.", "two", "Two dogs.", "the man's hat", "an apple, a pear", "3.5", "1,000",
    "1,000 people, mostly", "dont know", "Isnt it?", "a/b", "a / b", "left-handed",
    "left - handed", "(red)", " red ", "red\tand\nblue", "none", "ten o'clock", "oclock",
    "It's 10:30.", "U.S.A.", "e.g. this", "x=y+z", "hes", "Im here", "somebody'd",
    "whats up!", "well...", "#1", "50%", "2.", "end.", "mr. t", "yall", "a.b.c.d",
    "..........................................dots",
]

# Official-format files: questions, annotations (10 answers with ids), results.
QUESTIONS = [
    (1, "how many dogs?", ["2"] * 3 + ["two"] * 2 + ["3"] * 5, "Two"),
    (2, "what color?", ["red"] * 10, "Red."),
    (3, "what is it?", ["an apple"] * 4 + ["apple"] * 6, "apple"),
    (4, "what sport?", ["tennis"] * 2 + ["ping pong"] * 8, "tennis"),
    (5, "where?", ["left-handed"] * 3 + ["left handed"] * 7, "left handed"),
    (6, "which?", ["none"] * 10, "0"),
    (7, "time?", ["10:30"] * 5 + ["ten thirty"] * 5, "10:30."),
    (8, "is it?", ["yes"] * 1 + ["no"] * 9, "yes"),
    (9, "what?", ["dont know"] * 4 + ["don't know"] * 6, "Dont know"),
    (10, "count?", ["1,000"] * 10, "1000"),
]


def load_script():
  spec = importlib.util.find_spec("open_flamingo")
  path = os.path.join(os.path.dirname(spec.origin), "eval", "vqa_metric.py")
  module_spec = importlib.util.spec_from_file_location("vqa_metric", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def main():
  script = load_script()
  evaluator = script.VQAEval(None, None)
  normalized = {text: {"punctuation": evaluator.processPunctuation(text),
                       "digits_articles": evaluator.processDigitArticle(
                           evaluator.processPunctuation(text))} for text in TEXTS}
  questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
               "data_subtype": "val2014", "license": {},
               "questions": [{"question_id": q, "image_id": q, "question": text}
                             for q, text, _, _ in QUESTIONS]}
  annotations = {"annotations": [
      {"question_id": q, "image_id": q, "question_type": "what", "answer_type": "other",
       "multiple_choice_answer": answers[0],
       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                   for i, a in enumerate(answers)]}
      for q, _, answers, _ in QUESTIONS]}
  results = [{"question_id": q, "answer": prediction} for q, _, _, prediction in QUESTIONS]
  with tempfile.TemporaryDirectory() as tmp:
    paths = {}
    for name, value in (("questions", questions), ("annotations", annotations),
                        ("results", results)):
      paths[name] = os.path.join(tmp, f"{name}.json")
      with open(paths[name], "w") as f:
        json.dump(value, f)
    vqa = script.VQA(paths["annotations"], paths["questions"])
    result = vqa.loadRes(paths["results"], paths["questions"])
    evaluation = script.VQAEval(vqa, result, n=2)
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
      evaluation.evaluate()
    finally:
      sys.stdout = stdout
  fixture = {
      "source": "open_flamingo 2.0.1 open_flamingo/eval/vqa_metric.py",
      "normalized": normalized,
      "questions": [{"question_id": q, "answers": answers, "prediction": prediction}
                    for q, _, answers, prediction in QUESTIONS],
      # Per question, in percent rounded to 2 places, as the script reports it.
      "openflamingo_accuracy": {str(q): a for q, a in evaluation.evalQA.items()},
      "openflamingo_overall": evaluation.accuracy["overall"],
  }
  out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "vqa_fixture.json")
  with open(out, "w") as f:
    json.dump(fixture, f, indent=1, sort_keys=True)
    f.write("\n")


if __name__ == "__main__":
  main()
