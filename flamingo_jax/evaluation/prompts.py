"""Few-shot prompts as docs/paper.md §6 writes them, as text with `<image>` / `<EOC>` markers.

    query = Example("q1", media="cat.jpg", fields={"question": "What is it?"})
    shot = Example("s1", media="dog.jpg", fields={"question": "What is it?", "answer": "a dog"})
    prompt = build(QA, [shot], query)
    prompt.text   # "<image>Question: What is it? Answer: a dog<EOC><image>Question: What is it? Answer:"
    prompt.media  # ["dog.jpg", "cat.jpg"]: one item per <image>, in order

Each shot is `<image>{filled template}<EOC>`; the query is `<image>` and the template up to
its answer. Zero-shot (no shots) for open-ended tasks uses two text-only examples instead:
`{filled template}<EOC>` without their images. The tokenizer adds BOS
(inference's prompt encoding); a shot's answer is its first reference.
"""

import dataclasses
import re
from typing import Any, Mapping, Sequence

IMAGE, EOC = "<image>", "<EOC>"


@dataclasses.dataclass(frozen=True)
class Example:
  """One benchmark item: its media (a path, frame paths, or an array), the template fields
  (e.g. question, meme text) and the references the metric compares with (captions, the
  ten human answers, the label)."""
  id: str
  media: Any
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  references: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """A template whose last field is the answer: `text(e, True)` fills it from the example's
  first reference, `text(e, False)` stops right before it."""
  name: str
  template: str
  answer_field: str

  def text(self, example: Example, with_answer: bool) -> str:
    head, _, _ = self.template.partition("{" + self.answer_field + "}")
    fields = dict(example.fields)
    missing = [f for f in re.findall(r"{(\w+)}", head) if f not in fields]
    if missing:
      raise ValueError(f"example {example.id!r} lacks the field(s) {missing} of the "
                       f"{self.name!r} prompt")
    if not with_answer:
      return head.format(**fields).rstrip()
    if not example.references:
      raise ValueError(f"example {example.id!r} has no reference to use as a shot's answer")
    return self.template.format(**fields, **{self.answer_field: example.references[0]})

  def labels(self) -> list[str]:
    """The template's own labels ("Question:", "Answer:", "Output:"): where a generation that
    runs on into a new prompt is cut."""
    return re.findall(r"[A-Z][a-z]*:", self.template)


CAPTION = PromptFormat("caption", "Output: {output}", "output")          # non-QA tasks
QA = PromptFormat("qa", "Question: {question} Answer: {answer}", "answer")  # QA and dialogue
HATEFUL_MEMES = PromptFormat(
    "hateful_memes", 'is an image with written: "{text}" on it. Is it hateful? Answer: {answer}',
    "answer")
NAMING = PromptFormat("naming", "this is a {name}.", "name")   # the synthetic naming task
ATTRIBUTE = PromptFormat("attribute", "this is {answer}.", "answer")   # the synthetic attributes


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  media: list


def build(fmt: PromptFormat, shots: Sequence[Example], query: Example,
          zero_shot_examples: Sequence[Example] = ()) -> Prompt:
  """The prompt for `query` after `shots` (in the order given: with RICES the most similar
  shot comes last, directly before the query). With no shots, `zero_shot_examples` (two,
  for open-ended tasks) go first as text only."""
  if shots and zero_shot_examples:
    raise ValueError("zero-shot examples are for prompts without shots")
  parts, media = [], []
  for example in zero_shot_examples:
    parts.append(fmt.text(example, with_answer=True) + EOC)
  for shot in shots:
    parts.append(IMAGE + fmt.text(shot, with_answer=True) + EOC)
    media.append(shot.media)
  parts.append(IMAGE + fmt.text(query, with_answer=False))
  media.append(query.media)
  return Prompt("".join(parts), media)


def cut_generation(text: str, fmt: PromptFormat) -> str:
  """A generated answer, cut where the model ends it (`<EOC>`) or starts a new prompt (one
  of the template's labels), stripped."""
  text = text.split(EOC, 1)[0]
  for label in fmt.labels():
    text = text.split(label, 1)[0]
  return text.strip()
