"""Writes the IDEFICS fixtures of tests/test_idefics.py (run with transformers and torch: the
reference venv of docs/benchmarks.md, "The reference environment"):

    ~/.cache/flamingo-refvenv/bin/python tests/data/idefics/make_fixtures.py [OUT_DIR]

Two tiny random `IdeficsForVisionText2Text` models built by transformers, every option of
IDEFICS' config on in one and off in the other:

  options/  the perceiver resampler with qk_layer_norms_perceiver, qk_layer_norms in the gated
            cross-attention, alpha_type "vector", cross_layer_interval 2, a GELU vision tower
  plain/    no resampler (every vision token goes to cross-attention), no QK norms, alpha_type
            "float", cross_layer_interval 1, a QuickGELU vision tower

Each folder holds what a user downloads: config.json, model.safetensors (save_pretrained),
tokenizer.json (a byte-level BPE of 300 ids with IDEFICS' added tokens
`<fake_token_around_image>` 300 and `<image>` 301: the model's additional vocabulary), and
reference.npz: int32 input_ids [3, L] built as IdeficsProcessor lays out images (`<fake>
<image> <fake>`, consecutive images sharing a fake token), right-padded (attention_mask); a
row with text before its first image, one with two images in a row, one with an
end-of-sequence token between its images; uint8 media [3, 3, 1, H, W, 3] (unused slots 0);
image_attention_mask from the processor's own functions; float32 logits [3, L, V + 2]; and
generated int32 [1, <= 20]: transformers' greedy `generate` of up to 20 new tokens after
row 0 (up to its EOS).
Every parameter is randomised (gates and norms away from their init).
"""

import os
import sys

import numpy as np
import torch
import transformers
from transformers.models.idefics import processing_idefics

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "hf_lms"))
import make_fixtures as hf_lms  # noqa: E402  (the byte-level BPE tokenizer)

SEED = 0
VOCAB = 300                       # the BPE's ids; IDEFICS' two tokens follow
FAKE, IMAGE, EOS, PAD, BOS = VOCAB, VOCAB + 1, 0, 1, 0
SIZE, PATCH = 32, 8
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

VARIANTS = {
    "options": dict(use_resampler=True, qk_layer_norms=True, alpha_type="vector",
                    cross_layer_interval=2, perceiver_qk=True, vision_act="gelu"),
    "plain": dict(use_resampler=False, qk_layer_norms=False, alpha_type="float",
                  cross_layer_interval=1, perceiver_qk=False, vision_act="quick_gelu"),
}


def config(v: dict) -> transformers.IdeficsConfig:
  return transformers.IdeficsConfig(
      vocab_size=VOCAB, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
      num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-6, hidden_act="silu",
      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
      cross_layer_interval=v["cross_layer_interval"], qk_layer_norms=v["qk_layer_norms"],
      alpha_type=v["alpha_type"], use_resampler=v["use_resampler"],
      freeze_text_layers=True, freeze_lm_head=True, freeze_vision_layers=True,
      vision_config=dict(embed_dim=24, image_size=SIZE, patch_size=PATCH, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=48,
                         hidden_act=v["vision_act"]),
      perceiver_config=dict(use_resampler=v["use_resampler"], resampler_n_latents=5,
                            resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                            qk_layer_norms_perceiver=v["perceiver_qk"]))


def randomise(model: torch.nn.Module, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      is_scale = name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight",
                                "norm1.weight", "norm2.weight", "ln.weight", "layer_norm.weight"))
      if "alpha" in name:
        p.copy_(0.5 + 0.3 * noise)                  # open gates
      elif is_scale:
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.15 * noise)


def tokenizer():
  tok = hf_lms.tokenizer()
  assert tok.get_vocab_size() == VOCAB
  tok.add_special_tokens(["<fake_token_around_image>", "<image>"])
  assert tok.token_to_id("<fake_token_around_image>") == FAKE and tok.token_to_id("<image>") == IMAGE
  return tok


def prompts(tok) -> list[list[int]]:
  """Rows laid out as IdeficsProcessor lays out images."""
  words = lambda text: tok.encode(text).ids
  image = [FAKE, IMAGE, FAKE]
  return [
      [BOS] + words("Look at this:") + image + words("a red circle.") + image + words("two"),
      [BOS] + [FAKE, IMAGE, IMAGE, FAKE] + words("both are squares"),
      [BOS] + image + words("one blue") + [EOS] + words("next") + image + words("a"),
  ]


def main(out_dir: str) -> None:
  tok = tokenizer()
  rows = prompts(tok)
  length = max(map(len, rows))
  ids = np.full((len(rows), length), PAD, np.int64)
  mask = np.zeros_like(ids, bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, True
  rng = np.random.default_rng(SEED)
  counts = [sum(t == IMAGE for t in row) for row in rows]
  media = np.zeros((len(rows), 3, 1, SIZE, SIZE, 3), np.uint8)
  for i, n in enumerate(counts):
    media[i, :n] = rng.integers(0, 256, (n, 1, SIZE, SIZE, 3), dtype=np.uint8)
  pixels = (media[:, :, 0].astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  pixel_values = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).contiguous()  # [B, N, 3, H, W]

  class Tok:                     # what the processor's mask function asks of a tokenizer
    eos_token_id = EOS
    convert_tokens_to_ids = staticmethod(lambda token: IMAGE)
  incremental, _ = processing_idefics.image_attention_mask_for_packed_input_ids(
      torch.from_numpy(ids), Tok(), "pt")
  image_mask = processing_idefics.incremental_to_binary_attention_mask(
      incremental, "pt", num_classes=3)
  for k, (name, variant) in enumerate(VARIANTS.items()):
    torch.manual_seed(SEED + k)
    model = transformers.IdeficsForVisionText2Text(config(variant)).eval()
    randomise(model, SEED + 10 + k)
    with torch.no_grad():
      logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     pixel_values=pixel_values, image_attention_mask=image_mask).logits
      n = len(rows[0])
      generated = model.generate(
          input_ids=torch.from_numpy(ids[:1, :n]), attention_mask=torch.from_numpy(mask[:1, :n]),
          pixel_values=pixel_values[:1], image_attention_mask=image_mask[:1, :n],
          max_new_tokens=20, do_sample=False, num_beams=1, pad_token_id=PAD)[:, n:]
      stops = (generated[0] == EOS).nonzero()
      if len(stops):                                 # up to and including its EOS
        generated = generated[:, :int(stops[0]) + 1]
    path = os.path.join(out_dir, name)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    np.savez(os.path.join(path, "reference.npz"), input_ids=ids.astype(np.int32),
             attention_mask=mask, media=media, image_attention_mask=image_mask.numpy(),
             logits=logits.float().numpy(), generated=generated.numpy().astype(np.int32))
    print(name, sum(p.numel() for p in model.parameters()), "params; generated",
          generated[0].tolist(), file=sys.stderr)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else HERE)
