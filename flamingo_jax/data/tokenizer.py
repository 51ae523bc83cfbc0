"""Tokenizers with Flamingo's special tokens (docs/paper.md §10.1): `load(path)` picks one.

SentencePiece `.model` (ours, trained by tools/train_tokenizer.py): fixed ids

    PAD 0, UNK 1, BOS 2, EOS 3, <image> 4, <EOC> 5      (= flamingo_jax.config_base ids)

`<image>` and `<EOC>` are SentencePiece *control* symbols: they own their ids but encoding
text never produces them, so a document that contains the string "<image>" cannot inject a
media marker. The pipeline places them itself. Models are trained without SentencePiece's
dummy prefix, so a leading space is a real token (the paper's leading-space augmentation,
docs/paper.md §3.3, changes the input).

    python -m flamingo_jax.tools.train_tokenizer --corpus=FILE --vocab_size=512 --output=PREFIX

Hugging Face `tokenizer.json` (a pretrained LM's own, copied by tools/import_weights): its
pad/bos/eos ids, and `<image>` / `<EOC>` at the ids the import gave them (appended after the
LM's vocabulary), come from `special_tokens.json` beside it. Those two ids are ours alone:
they are not added to the tokenizer's vocabulary, so text can never produce them (the same
guarantee as the control symbols above); `decode` writes them as `<image>` / `<EOC>`.
"""

import io
import json
import os
import re
from typing import Iterable, NamedTuple

import sentencepiece as spm
import tokenizers

from flamingo_jax import config_base

PAD_ID, UNK_ID, BOS_ID, EOS_ID = (config_base.PAD_ID, config_base.UNK_ID, config_base.BOS_ID,
                                  config_base.EOS_ID)
IMAGE_ID, EOC_ID = config_base.IMAGE_ID, config_base.EOC_ID
IMAGE_PIECE, EOC_PIECE = "<image>", "<EOC>"



class SpecialIds(NamedTuple):
  """The ids the pipeline places itself (preprocessing.py)."""
  pad: int
  bos: int
  eos: int
  image: int
  eoc: int
  # IDEFICS: <fake_token_around_image> on both sides of each <image>, one shared between
  # consecutive images (its processor's layout); -1: none.
  image_around: int = -1


def image_tokens(special: SpecialIds, previous: int) -> list[int]:
  """The ids one image marker becomes after the token `previous`."""
  if special.image_around < 0:
    return [special.image]
  if previous == special.image_around:          # right after an image: share its token
    return [special.image, special.image_around]
  return [special.image_around, special.image, special.image_around]


SENTENCEPIECE_IDS = SpecialIds(PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, EOC_ID)
SPECIAL_TOKENS_FILE = "special_tokens.json"    # beside a tokenizer.json

# The committed model for the tiny configs (trained on the synthetic captions).
TINY_MODEL_PATH = os.path.join(os.path.dirname(__file__), "assets", "synthetic_sp.model")


class Tokenizer:
  """Encodes text to ids and back; checks that the special ids are where we expect them."""

  def __init__(self, model_path: str):
    if not model_path:
      raise ValueError("config.data.tokenizer_path is empty: pass a SentencePiece .model "
                       "(real runs: a 32k model; tiny configs use data/assets/synthetic_sp.model)")
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer model {model_path!r} not found")
    self.path = model_path
    self.special = SENTENCEPIECE_IDS
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>",
                IMAGE_ID: IMAGE_PIECE, EOC_ID: EOC_PIECE}
    got = {i: self._sp.id_to_piece(i) for i in expected}
    if got != expected:
      raise ValueError(f"tokenizer {model_path!r} has special pieces {got}; Flamingo needs "
                       f"{expected} (train it with flamingo_jax.tools.train_tokenizer)")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens written as their pieces; padding dropped, and ids past
    the tokenizer's pieces (the model's vocabulary padded beyond it) too."""
    out, run, size = [], [], self.vocab_size
    for i in ids:
      i = int(i)
      if i == PAD_ID or i >= size:
        continue
      if i in (BOS_ID, EOS_ID, IMAGE_ID, EOC_ID):
        out.append(self._sp.decode(run))
        run = []
        out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library) with our special ids."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer {path!r} not found")
    ids_path = os.path.join(os.path.dirname(path), SPECIAL_TOKENS_FILE)
    if not os.path.exists(ids_path):
      raise ValueError(f"{path} needs {ids_path} ({{'pad', 'bos', 'eos', 'image', 'eoc'}} ids; "
                       "tools/import_weights writes it)")
    with open(ids_path) as f:
      ids = json.load(f)
    try:
      self.special = SpecialIds(**{k: int(ids[k]) for k in SpecialIds._fields[:5]},
                                image_around=int(ids.get("image_around", -1)))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{ids_path} must map {SpecialIds._fields[:5]} to integer ids ({e})"
                       ) from None
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    size = self._tok.get_vocab_size(with_added_tokens=True)
    # "tokenizer_ids": ours that are the tokenizer's own tokens (IDEFICS' <image>, its EOS as
    # <EOC>); the others are past its vocabulary, so that text never produces them.
    own = set(int(i) for i in ids.get("tokenizer_ids", []))
    ours = (self.special.image, self.special.eoc)
    if len(set(ours)) != 2 or any(i < size and i not in own for i in ours):
      raise ValueError(f"{ids_path}: <image>/<EOC> ids {ours} must be distinct and past the "
                       f"tokenizer's {size} ids (or listed in its 'tokenizer_ids')")
    self._pieces = {i: p for i, p in ((self.special.image, IMAGE_PIECE),
                                      (self.special.eoc, EOC_PIECE)) if i not in own}

  @property
  def vocab_size(self) -> int:
    return max([self._tok.get_vocab_size(with_added_tokens=True) - 1, *self._pieces]) + 1

  def piece_to_id(self, piece: str) -> int:
    for i, p in self._pieces.items():
      if p == piece:
        return i
    found = self._tok.token_to_id(piece)
    return UNK_ID if found is None else found

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; `<image>`/`<EOC>` written as pieces; padding dropped (unless it is EOS)."""
    out, run = [], []
    for i in ids:
      i = int(i)
      if i == self.special.pad and i != self.special.eos:
        continue
      if i in self._pieces:
        out.append(self._tok.decode(run, skip_special_tokens=False))
        run = []
        out.append(self._pieces[i])
      else:
        run.append(i)
    out.append(self._tok.decode(run, skip_special_tokens=False))
    return "".join(out)


_MARKERS = re.compile(r"(<image>|<EOC>)")


def split_markers(text: str) -> list[str]:
  """`text` cut at its `<image>` / `<EOC>` markers, the markers kept as pieces."""
  return _MARKERS.split(text)


def encode_with_markers(text: str, tokenizer) -> list[int]:
  """BOS + `text`, whose `<image>` / `<EOC>` markers become their ids (never tokenised): a
  prompt as training sequences look (generation, evaluation)."""
  special = tokenizer.special
  ids = [special.bos]
  for piece in split_markers(text):
    if piece == IMAGE_PIECE:
      ids.extend(image_tokens(special, ids[-1]))
    elif piece == EOC_PIECE:
      ids.append(special.eoc)
    elif piece:
      ids.extend(tokenizer.encode(piece))
  return ids


def decode_until_stop(tokens, tokenizer) -> str:
  """Generated ids -> text on one line, cut at the first `<EOC>` or EOS."""
  special = tokenizer.special
  cut = []
  for t in tokens:
    if t in (special.eoc, special.eos):
      break
    cut.append(t)
  return tokenizer.decode(cut).replace("\n", " ").strip()


def load(path: str):
  """`Tokenizer` for a SentencePiece `.model`, `HFTokenizer` for a `tokenizer.json`."""
  if path.endswith(".json"):
    return HFTokenizer(path)
  return Tokenizer(path)


def train(sentences: Iterable[str], vocab_size: int, model_prefix: str) -> str:
  """Trains a BPE model on `sentences`; returns the `.model` path."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      control_symbols=[IMAGE_PIECE, EOC_PIECE], add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
  path = model_prefix + ".model"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path
