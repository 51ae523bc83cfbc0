r"""Train a SentencePiece model with Flamingo's special ids (data/tokenizer.py).

  # The committed model of the tiny configs, from the synthetic captions:
  python -m flamingo_jax.tools.train_tokenizer --synthetic --vocab_size=512 \
      --output=flamingo_jax/data/assets/synthetic_sp
  # A real one (the paper's LM uses 32k pieces), from a text file, one sentence per line:
  python -m flamingo_jax.tools.train_tokenizer --corpus=text.txt --vocab_size=32000 --output=spm32k
"""

from absl import app
from absl import flags

from flamingo_jax import cli
from flamingo_jax.data import synthetic
from flamingo_jax.data import tokenizer as tok

_CORPUS = flags.DEFINE_string("corpus", "", "Text file, one sentence per line.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Train on the synthetic sources' sentences.")
_VOCAB = flags.DEFINE_integer("vocab_size", 512, "Upper bound on the number of pieces.")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model.", required=True)


def main(argv):
  del argv
  if bool(_CORPUS.value) == _SYNTHETIC.value:
    raise app.UsageError("pass exactly one of --corpus and --synthetic")
  if _SYNTHETIC.value:
    sentences = synthetic.corpus()
  else:
    with open(_CORPUS.value, encoding="utf-8") as f:
      sentences = [line.rstrip("\n") for line in f if line.strip()]
  path = tok.train(sentences, _VOCAB.value, _OUTPUT.value)
  print(f"wrote {path}: {tok.Tokenizer(path).vocab_size} pieces")


if __name__ == "__main__":
  cli.run(main)
