"""`import_weights --kind=idefics`: a Hugging Face IDEFICS folder (IdeficsForVisionText2Text:
config.json, *.safetensors, tokenizer.json) -> an import folder: OUTPUT/params (every
parameter, orbax), OUTPUT/model.json (the `config.model` fields: LM, ViT, resampler and
gated-block options, token ids; weights/idefics.py) and its tokenizer.json with
special_tokens.json (its own ids: `<image>`, `<fake_token_around_image>` around each image,
`<end_of_utterance>` or EOS as <EOC>). Run or fine-tune it with
`--config=experiments/configs/idefics.py:OUTPUT`.
"""

import json
import os
import shutil
import time

from flamingo_jax.tools import lm_import


def write_tokenizer(source: str, tmp: str, fields: dict) -> bool:
  """tokenizer.json copied; special_tokens.json with IDEFICS' ids (all the tokenizer's own)."""
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  path = os.path.join(source, "tokenizer.json")
  hf = weights.families.read_hf_config(source)
  with open(path) as f:
    added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
  eos, bos = int(hf.get("eos_token_id", 2)), int(hf.get("bos_token_id", 1))
  pad = hf.get("pad_token_id")
  shutil.copy(path, os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "special_tokens.json"), "w") as f:
    json.dump({"pad": eos if pad is None else int(pad), "bos": bos, "eos": eos,
               "image": fields["image_token_id"], "eoc": fields["eoc_token_id"],
               "image_around": added.get("<fake_token_around_image>", -1),
               "tokenizer_ids": [fields["image_token_id"], fields["eoc_token_id"]]}, f, indent=1)
  return True


def run(source: str, output: str, *, dtype: str = "keep", vit_activation: str = "",
        pad_vocab_multiple: int = 128, progress: bool = True) -> dict:
  """The import; returns the report. Raises weights.CheckpointError (nothing written)."""
  from flamingo_jax.weights import idefics  # pylint: disable=g-import-not-at-top
  lm_import.check_output_is_new(output)
  start = time.time()
  params, fields, report = idefics.load_idefics(
      source, pad_vocab_multiple=pad_vocab_multiple, vit_activation=vit_activation,
      dtype=None if dtype == "keep" else dtype, progress=progress)
  lm_import.write_import_folder(output, params, fields,
                                lambda tmp: write_tokenizer(source, tmp, fields))
  return report | {"kind": "idefics", "output": output, "vocab_size": fields["vocab_size"],
                   "image_token_id": fields["image_token_id"],
                   "eoc_token_id": fields["eoc_token_id"],
                   "xattn_every": fields["xattn"]["every"],
                   "resampler": fields["resampler"]["kind"],
                   "seconds": round(time.time() - start, 2)}
