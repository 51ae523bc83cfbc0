"""Writes the OpenFlamingo module fixtures of tests/test_openflamingo.py (run with
open_flamingo 2.0.1 installed, and einops-exts: the reference venv of
docs/benchmarks.md, "The reference environment").

  ~/.cache/flamingo-refvenv/bin/python tests/data/openflamingo/make_fixture.py [OUT_DIR]

OpenFlamingo's own modules at a small size, every parameter randomised:
- its PerceiverResampler as its factory builds it (no frame or media-time embeddings): dim
  32, 2 layers, 4 heads of 8, 6 latents. resampler.safetensors (state dict under
  `perceiver.`, as in an OpenFlamingo checkpoint), resampler_in.npy (vision_x [b=2, T=3
  media, F=2 frames, v=5, 32]), resampler_out.npy ([2, 3, 6, 32]).
- a GatedCrossAttentionBlock: text width 32, visual width 24, 4 heads of 8, non-zero gates.
  xattn.safetensors (under `lang_encoder.gated_cross_attn_layers.0.`), xattn_text.npy
  [2, 7, 32], xattn_media.npy [2, 2 media, 3 latents, 24], xattn_locations.npy (bool [2, 7]:
  row 0 has text before its first image and two images, row 1 one image at position 0),
  xattn_out.npy [2, 7, 32].
- model/: a whole OpenFlamingo, built by its own `create_model_and_transforms` from local
  folders (no downloads): a 6-layer GPT-NeoX (Pythia-style: parallel residual, partial
  rotary; dim 32, 4 heads) with a byte-level BPE tokenizer of 300 ids, and an open_clip ViT
  (32 px, patch 8, width 32, 2 layers, QuickGELU), cross_attn_every_n_layers=2 (gated blocks
  before layers 1, 3 and 5). Every parameter randomised (gates non-zero; the LM's layers
  only in lm/, as a frozen LM is) and rounded to bfloat16, so that the files can be bfloat16
  and the float32 forward is exact. Files: lm/ (the base LM as save_pretrained writes it, +
  tokenizer.json), vit.safetensors (the CLIP's `visual.*`), checkpoint.safetensors (the
  state dict as OpenFlamingo's training saves it: `filter_state_dict_to_trainable`, so
  embeddings, resampler and gated blocks), input_ids.npy (int32 [3, L]: interleaved prompts
  from its tokenizer, 2-3 `<image>` per row, one row with text before its first image,
  right-padded with `<PAD>`), media.npy (uint8 [3, 3, 1, 32, 32, 3]; a row with 2 images
  leaves its third slot unused), and logits.npy (float32 [3, L, 303], its forward on the
  same input normalised with CLIP's statistics; NaN at padding). Also checkpoint.pt
  (torch.save of the same state dict) for the torch.load path; not committed (the suite
  has no torch; .gitignore).

Its text tokenizer gets OpenFlamingo's additions: `<|endofchunk|>` 300, `<image>` 301,
`<PAD>` 302 (the LM's table is resized from 320 to 303 rows, as for RedPajama's 50432 ->
50280).
"""

import json
import os
import shutil
import sys
import tempfile
import types

import numpy as np
from safetensors.torch import save_file
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference_env  # pylint: disable=g-import-not-at-top,wrong-import-position

reference_env.allow_missing_torchvision()

import open_clip  # pylint: disable=g-import-not-at-top,wrong-import-position
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler  # pylint: disable=g-import-not-at-top,wrong-import-position,line-too-long

SEED = 0
DIM, DEPTH, HEADS, DIM_HEAD, LATENTS = 32, 2, 4, 8, 6


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      is_norm_scale = p.ndim == 1 and name.endswith("weight")     # LayerNorm scales
      p.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.3 * noise)
  return module.eval()


LM_LAYERS, LM_DIM, EVERY = 6, 32, 2
VIT = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
PROMPTS = ("<image>a red circle<|endofchunk|><image>two blue squares<|endofchunk|>",
           "Look: <image>three green triangles<|endofchunk|><image>one<|endofchunk|>"
           "<image>a yellow",
           "<image><image>a circle and a square")


def _bf16(module: torch.nn.Module, seed: int) -> None:
  """Randomises `module` (norm scales near 1, gates non-zero), rounded to bfloat16."""
  randomise(module, seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(p.to(torch.bfloat16).float())


def _base_lm(path: str, kind: str = "gpt_neox") -> None:
  import transformers  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "hf_lms"))
  import make_fixtures  # pylint: disable=g-import-not-at-top  (its tokenizer)
  torch.manual_seed(SEED)
  if kind == "gpt_neox":
    lm = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=make_fixtures.VOCAB, hidden_size=LM_DIM, intermediate_size=2 * LM_DIM,
        num_hidden_layers=LM_LAYERS, num_attention_heads=4, rotary_pct=0.25,
        use_parallel_residual=True, hidden_act="gelu", bos_token_id=0, eos_token_id=0))
  else:   # MPT as transformers builds it (OpenFlamingo-3B/9B's family): ALiBi, clip_qkv, tied
    lm = transformers.MptForCausalLM(transformers.MptConfig(
        vocab_size=make_fixtures.VOCAB, d_model=LM_DIM, n_heads=4, n_layers=LM_LAYERS,
        max_seq_len=64, no_bias=True, attn_config={"alibi": True, "clip_qkv": 0.5},
        bos_token_id=0, eos_token_id=0))
  _bf16(lm, SEED + 10)
  lm.save_pretrained(path, safe_serialization=True)
  make_fixtures.tokenizer().save(os.path.join(path, "tokenizer.json"))


def _vit_config(directory: str, quick_gelu: bool = True) -> str:
  name = "fixture-vit" if quick_gelu else "fixture-vit-gelu"
  config = {"embed_dim": 16, "vision_cfg": VIT,
            "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2,
                         "layers": 1}}
  if quick_gelu:
    config["quick_gelu"] = True
  with open(os.path.join(directory, f"{name}.json"), "w") as f:
    json.dump(config, f)
  open_clip.add_model_config(directory)
  return name


def whole_model(out_dir: str, lm_kind: str = "gpt_neox") -> None:
  """An OpenFlamingo built by its factory, and its logits on an interleaved batch. With
  lm_kind="mpt" (model_mpt/): an MPT LM (transformers' MptForCausalLM, loaded by the factory
  from its folder, blocks found as `transformer.blocks`), gated blocks every 3 layers, and a
  GELU ViT (no quick_gelu: open_clip's default) written as an open_clip folder (vit/:
  open_clip_config.json + open_clip_model.safetensors)."""
  from open_flamingo.src import factory  # pylint: disable=g-import-not-at-top
  sys.modules.setdefault("wandb", types.ModuleType("wandb"))     # imported, never used
  from open_flamingo.train.train_utils import filter_state_dict_to_trainable  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  lm_dir = os.path.join(out_dir, "lm")
  _base_lm(lm_dir, lm_kind)
  mpt = lm_kind == "mpt"
  scratch = tempfile.mkdtemp()
  try:
    vit_name = _vit_config(scratch, quick_gelu=not mpt)
    # Its factory with open_clip's own model: only the image transforms are left out (they
    # need torchvision, which the registries do not have for this torch).
    original = open_clip.create_model_and_transforms
    factory.open_clip.create_model_and_transforms = (
        lambda name, pretrained=None: (open_clip.create_model(name, pretrained=pretrained),
                                       None, None))
    model, _, tokenizer = factory.create_model_and_transforms(
        vit_name, None, lm_dir, lm_dir, cross_attn_every_n_layers=3 if mpt else EVERY)
    factory.open_clip.create_model_and_transforms = original
  finally:
    shutil.rmtree(scratch)
  # What training changes (the frozen LM layers stay the base LM's, as in lm/).
  for i, part in enumerate((model.vision_encoder, model.perceiver,
                            model.lang_encoder.gated_cross_attn_layers,
                            model.lang_encoder.get_input_embeddings(),
                            model.lang_encoder.get_output_embeddings())):
    _bf16(part, SEED + 20 + i)
  model.eval()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  trainable = filter_state_dict_to_trainable(model, dict(state))
  save_file({k: v.to(torch.bfloat16) for k, v in trainable.items()},
            os.path.join(out_dir, "checkpoint.safetensors"))
  torch.save(trainable, os.path.join(out_dir, "checkpoint.pt"))
  visual = {f"visual.{k[len('vision_encoder.'):]}": v.to(torch.bfloat16)
            for k, v in state.items() if k.startswith("vision_encoder.")}
  if mpt:            # an open_clip folder: its config says the activation
    os.makedirs(os.path.join(out_dir, "vit"), exist_ok=True)
    save_file(visual, os.path.join(out_dir, "vit", "open_clip_model.safetensors"))
    with open(os.path.join(out_dir, "vit", "open_clip_config.json"), "w") as f:
      json.dump({"model_cfg": {"embed_dim": 16, "vision_cfg": VIT}}, f, indent=1)
  else:
    save_file(visual, os.path.join(out_dir, "vit.safetensors"))

  tokenizer.padding_side = "right"
  batch = tokenizer(list(PROMPTS), padding="longest", return_tensors="pt")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  rng = np.random.default_rng(SEED)
  size = VIT["image_size"]
  media = rng.integers(0, 256, (len(PROMPTS), 3, 1, size, size, 3), dtype=np.uint8)
  mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
  std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
  pixels = torch.from_numpy(media).float().div(255.0).permute(0, 1, 2, 5, 3, 4)
  vision_x = (pixels - mean) / std                                  # [B, T_img, F, C, H, W]
  with torch.no_grad():
    logits = model(vision_x=vision_x, lang_x=ids, attention_mask=mask).logits
  logits = torch.where(mask[..., None].bool(), logits, torch.nan)
  np.save(os.path.join(out_dir, "input_ids.npy"), ids.numpy().astype(np.int32))
  np.save(os.path.join(out_dir, "media.npy"), media)
  np.save(os.path.join(out_dir, "logits.npy"), logits.float().numpy())
  print(f"wrote {out_dir}: {len(trainable)} checkpoint tensors, ids "
        f"{tuple(ids.shape)}, logits {tuple(logits.shape)}; <|endofchunk|> "
        f"{model.eoc_token_id}, <image> {model.media_token_id}")


def main(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  resampler = randomise(PerceiverResampler(dim=DIM, depth=DEPTH, dim_head=DIM_HEAD, heads=HEADS,
                                           num_latents=LATENTS), SEED)
  x = torch.randn(2, 3, 2, 5, DIM, generator=torch.Generator().manual_seed(SEED + 1))
  with torch.no_grad():
    out = resampler(x)
  save_file({f"perceiver.{k}": v.contiguous() for k, v in resampler.state_dict().items()},
            os.path.join(out_dir, "resampler.safetensors"))
  np.save(os.path.join(out_dir, "resampler_in.npy"), x.numpy())
  np.save(os.path.join(out_dir, "resampler_out.npy"), out.numpy())

  block = randomise(GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4,
                                             ff_mult=4), SEED + 2)
  generator = torch.Generator().manual_seed(SEED + 3)
  text = torch.randn(2, 7, 32, generator=generator)
  media = torch.randn(2, 2, 3, 24, generator=generator)
  locations = torch.tensor([[0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
  with torch.no_grad():
    xattn_out = block(text, media, media_locations=locations)
  save_file({f"lang_encoder.gated_cross_attn_layers.0.{k}": v.contiguous()
             for k, v in block.state_dict().items()}, os.path.join(out_dir, "xattn.safetensors"))
  for name, value in (("xattn_text", text), ("xattn_media", media),
                      ("xattn_locations", locations), ("xattn_out", xattn_out)):
    np.save(os.path.join(out_dir, f"{name}.npy"), value.numpy())
  whole_model(os.path.join(out_dir, "model"))
  whole_model(os.path.join(out_dir, "model_mpt"), lm_kind="mpt")
  print(f"wrote {out_dir}: resampler out {tuple(out.shape)}, xattn out {tuple(xattn_out.shape)}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
