"""`import_weights --kind=openflamingo`: an OpenFlamingo 2.0.1 model -> an import folder:
OUTPUT/params (every parameter of the whole Flamingo, orbax), OUTPUT/model.json (the
`config.model` fields: LM, ViT, resampler and gated-block options, token ids) and the base
LM's tokenizer.json with special_tokens.json (`<image>` / `<|endofchunk|>` at OpenFlamingo's
ids). Run or train it with `--config=experiments/configs/openflamingo.py:OUTPUT`.

  --source  its checkpoint.pt (read with torch.load(weights_only=True): needs torch) or a
            safetensors export of that state dict
  --lm      the base LM's Hugging Face folder (config.json, *.safetensors, tokenizer.json)
  --vision  its CLIP ViT's OpenCLIP state dict (safetensors); not needed when the checkpoint
            holds vision_encoder.*
"""

import time

from flamingo_jax.tools import lm_import


def run(source: str, output: str, *, lm: str, vision: str = "", dtype: str = "keep",
        dim_head: int = 64, vit_heads: int = 0, vit_activation: str = "",
        base_vocab: int = 0, pad_vocab_multiple: int = 128, progress: bool = True) -> dict:
  """The import; returns the report. Raises weights.CheckpointError (nothing written)."""
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import openflamingo  # pylint: disable=g-import-not-at-top
  if not lm:
    raise weights.CheckpointError("--kind=openflamingo needs --lm=HF_DIR (its base LM's "
                                  "Hugging Face folder: the frozen layers and the tokenizer)")
  lm_import.check_output_is_new(output)
  start = time.time()
  params, fields, report = openflamingo.load_openflamingo(
      source, lm, vision, dim_head=dim_head, vit_heads=vit_heads,
      vit_activation=vit_activation, base_vocab_size=base_vocab,
      pad_vocab_multiple=pad_vocab_multiple,
      dtype=None if dtype == "keep" else dtype, progress=progress)
  tokenizer = lm_import.write_import_folder(
      output, params, fields, lambda tmp: lm_import.write_tokenizer(lm, tmp, fields))
  return report | {"kind": "openflamingo", "output": output, "tokenizer": tokenizer,
                   "vocab_size": fields["vocab_size"],
                   "image_token_id": fields["image_token_id"],
                   "eoc_token_id": fields["eoc_token_id"],
                   "xattn_every": fields["xattn"]["every"],
                   "seconds": round(time.time() - start, 2)}
