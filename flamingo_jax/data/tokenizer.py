"""SentencePiece tokenizer with Flamingo's special tokens at fixed ids (PAPER.md §10.1).

    PAD 0, UNK 1, BOS 2, EOS 3, <image> 4, <EOC> 5      (= flamingo_jax.config_base ids)

`<image>` and `<EOC>` are SentencePiece *control* symbols: they own their ids but encoding
text never produces them, so a document that contains the string "<image>" cannot inject a
media marker. The pipeline places them itself. Models are trained without SentencePiece's
dummy prefix, so a leading space is a real token (the paper's leading-space augmentation,
PAPER.md §3.3, changes the input).

    python -m flamingo_jax.tools.train_tokenizer --corpus=FILE --vocab_size=512 --output=PREFIX
"""

import io
import os
from typing import Iterable

import sentencepiece as spm

from flamingo_jax import config_base

PAD_ID, UNK_ID, BOS_ID, EOS_ID = (config_base.PAD_ID, config_base.UNK_ID, config_base.BOS_ID,
                                  config_base.EOS_ID)
IMAGE_ID, EOC_ID = config_base.IMAGE_ID, config_base.EOC_ID
IMAGE_PIECE, EOC_PIECE = "<image>", "<EOC>"

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
    """Text of `ids`, special tokens written as their pieces; padding dropped."""
    out, run = [], []
    for i in ids:
      i = int(i)
      if i == PAD_ID:
        continue
      if i in (BOS_ID, EOS_ID, IMAGE_ID, EOC_ID):
        out.append(self._sp.decode(run))
        run = []
        out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)


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
