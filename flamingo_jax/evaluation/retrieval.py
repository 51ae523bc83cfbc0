"""Zero-shot image-text retrieval of a contrastive model (docs/paper.md §5: R@1 on Flickr30K and
COCO, image->text and text->image).

    pairs = retrieval.karpathy_pairs(tasks.get("coco").load(DIR))    # or synthetic_pairs(...)
    report = retrieval.evaluate(embedder, tokenizer, pairs, image_size=288, max_tokens=64)

A text is relevant to an image when it is one of that image's captions; a caption string
is one text however many images have it (synthetic captions repeat; the relevant images of
its text->image query are all of them). R@K is the share of
queries with a relevant item among the K most similar (cosine) of the other modality;
`chance` is R@1 of a random ranking, for comparison.
"""

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from flamingo_jax.data import preprocessing
from flamingo_jax.data import sources
from flamingo_jax.data import synthetic


@dataclasses.dataclass(frozen=True)
class Pairs:
  images: list             # per image: a path, or uint8 [H, W, 3]
  captions: list           # per image: its captions (list of str)
  skipped: dict = dataclasses.field(default_factory=dict)


def relevance(captions: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
  """(the distinct captions, in order of first appearance; bool [images, texts]: which
  image has which caption). Repeated captions are one text (else an image->text list would
  hold copies of one wrong caption, and R@5 would say nothing R@1 does not)."""
  texts = list(dict.fromkeys(c for per_image in captions for c in per_image))
  column = {c: j for j, c in enumerate(texts)}
  relevant = np.zeros((len(captions), len(texts)), bool)
  for i, per_image in enumerate(captions):
    relevant[i, [column[c] for c in per_image]] = True
  return texts, relevant


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray,
                ks: Sequence[int] = (1, 5)) -> dict[str, dict[str, float]]:
  """similarity, relevant [images, texts] -> {"image_to_text": {"R@1": ...}, "text_to_image":
  {...}}: the share of queries with a relevant item among their top K (ties: lower index
  first, so a constant similarity scores as a fixed, not a lucky, ranking)."""
  out = {}
  for name, sim, rel in (("image_to_text", similarity, relevant),
                         ("text_to_image", similarity.T, relevant.T)):
    order = np.argsort(-sim, axis=1, kind="stable")                      # [queries, items]
    hits = np.take_along_axis(rel, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])
    out[name] = {f"R@{k}": float(np.mean(first < k)) for k in ks}
  return out


def chance(relevant: np.ndarray) -> dict[str, float]:
  """R@1 of a random ranking: the mean share of relevant items per query."""
  return {"image_to_text": float(np.mean(relevant.mean(axis=1))),
          "text_to_image": float(np.mean(relevant.mean(axis=0)))}


def karpathy_pairs(split: Any, limit: int = 0) -> Pairs:
  """The test images of a captioning task (evaluation/tasks.py: coco, flickr30k) and their
  reference captions."""
  queries = split.queries[:limit] if limit else split.queries
  return Pairs([q.media for q in queries], [list(q.references) for q in queries],
               dict(split.skipped))


def synthetic_pairs(count: int, seed: int, size: int = 96) -> Pairs:
  """`count` held-out synthetic scenes (data/synthetic.py) and their one caption each."""
  rng = np.random.default_rng(seed)
  images, captions = [], []
  for _ in range(count):
    image, attrs = synthetic.scene(rng, size)
    images.append(image)
    captions.append([synthetic.caption(attrs)])
  return Pairs(images, captions)


def text_arrays(texts: Sequence[str], tokenizer: Any, max_tokens: int) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
  """Captions tokenised as the contrastive stage trains on them (`<image>` caption `<EOC>`,
  cut to max_tokens) -> (input_ids, text mask: the trained loss mask) int32/float32 [N, L]."""
  rows = [preprocessing.to_arrays(
      preprocessing.pair_tokens(t, tokenizer.encode, False, tokenizer.special, max_tokens),
      max_tokens, tokenizer.special) for t in texts]
  return (np.stack([r["input_ids"] for r in rows]), np.stack([r["loss_mask"] for r in rows]))


def evaluate(embedder: Any, tokenizer: Any, pairs: Pairs, *, image_size: int, max_tokens: int,
             progress: Callable[[int], None] | None = None,
             load: Callable[[Any], np.ndarray] | None = None) -> dict[str, Any]:
  """R@1 / R@5 both ways over `pairs`; an image that does not load is skipped and counted.
  `progress(n)` is told of each image loaded (a progress bar)."""
  load = load or (lambda item: (preprocessing.load_image(item, image_size) if isinstance(item, str)
                                else preprocessing.resize_and_pad(item, image_size)))
  skipped = dict(pairs.skipped)
  pixels, captions = [], []
  for index, (item, caps) in enumerate(zip(pairs.images, pairs.captions)):
    if progress is not None and (index % 100 == 99 or index == len(pairs.images) - 1):
      progress(index % 100 + 1)
    try:
      pixels.append(load(item))
    except sources.Skip as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    captions.append(caps)
  if not pixels:
    raise ValueError("no image of the retrieval set could be loaded")
  texts, relevant = relevance(captions)
  image_emb = embedder.images(np.stack(pixels))
  text_emb = embedder.texts(*text_arrays(texts, tokenizer, max_tokens))
  similarity = image_emb @ text_emb.T
  return {"images": len(pixels), "texts": len(texts), **recall_at_k(similarity, relevant),
          "chance_R@1": chance(relevant), "skipped": skipped}
