"""Writes the Hugging Face reference LMs of tests/test_lm_import.py (run from the repo root):

    REF=~/.cache/flamingo-refvenv/bin/python   # ../shared/bench/README.md, + pillow
    $REF tests/data/hf_lms/make_fixtures.py [OUT_DIR]     # default: tests/data/hf_lms

For each family a tiny random model built by the real `transformers` library (every weight
perturbed, so that norms and biases are not at their init), saved with `save_pretrained`
(safetensors; llama as several shards with an index), a byte-level BPE `tokenizer.json`
trained on the synthetic captions, and `reference.npz`: int32 `input_ids` [3, 12] with
right padding (`attention_mask`), and float32 `logits` [3, 12, V] from the library.
test_lm_import.py reruns this script when transformers is importable and compares.
"""

import json
import os
import sys

import numpy as np
import tokenizers
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO)
from flamingo_jax.data import synthetic  # noqa: E402  (numpy + PIL only)

VOCAB = 320
LENGTHS = (12, 9, 5)      # rows of the batch; the rest of each row is padding


def tokenizer() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB - 20, special_tokens=["<|endoftext|>", "<|padding|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(synthetic.corpus(count=300), trainer)
  return tok


def models() -> dict:
  common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1)
  return {
      # Grouped-query attention (4 query heads on 2 key/value heads), SwiGLU, rope 500k.
      "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
          hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500_000.0, **common)),
      # Mistral: sliding-window attention (window 4 < the 12 tokens).
      "mistral": transformers.MistralForCausalLM(transformers.MistralConfig(
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=1, sliding_window=4, **common)),
      # Pythia-style: parallel residual, rotary on 25% of each head, biases, exact GELU.
      "gpt_neox": transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
          hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
          rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu", **common)),
      # Gemma 1: head_dim 24 != hidden/heads, multi-query, GeGLU, tied, sqrt(D) embeddings.
      "gemma": transformers.GemmaForCausalLM(transformers.GemmaConfig(
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
          num_key_value_heads=1, head_dim=24, hidden_activation="gelu_pytorch_tanh",
          **common)),
  }


def main(out_dir: str) -> None:
  torch.manual_seed(0)
  tok = tokenizer()
  rng = np.random.default_rng(0)
  ids = rng.integers(2, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int64)
  mask = np.arange(ids.shape[1])[None] < np.asarray(LENGTHS)[:, None]
  ids = np.where(mask, ids, 1)
  for name, model in models().items():
    model.config._attn_implementation = "eager"
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
      logits = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    path = os.path.join(out_dir, name)
    shard = {"max_shard_size": "40KB"} if name == "llama" else {}
    model.save_pretrained(path, safe_serialization=True, **shard)
    tok.save(os.path.join(path, "tokenizer.json"))
    np.savez(os.path.join(path, "reference.npz"), input_ids=ids.astype(np.int32),
             attention_mask=mask, logits=logits.float().numpy())
    print(name, sum(p.numel() for p in model.parameters()), "params", file=sys.stderr)
  with open(os.path.join(out_dir, "versions.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
               "tokenizers": tokenizers.__version__}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
