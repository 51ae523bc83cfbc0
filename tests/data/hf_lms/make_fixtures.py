"""Writes the Hugging Face reference LMs of tests/test_lm_import.py (run from the repo root):

    REF=~/.cache/flamingo-refvenv/bin/python   # docs/benchmarks.md, "The reference environment", + pillow
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
import types

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


# -- MPT beyond what transformers implements -------------------------------------------------
# transformers' MptForCausalLM (the oracle of the "mpt" fixture) has MosaicML's names but only
# some of its options: no biases, no QK LayerNorm, a 4x feed-forward, tied embeddings and
# ALiBi with alibi_bias_max 8 whatever the config says. MosaicML's own MPT (llm-foundry) and
# the older MosaicGPT of MPT-1B-RedPajama (OpenFlamingo-3B's LM) also have biases everywhere
# (no_bias=False), LayerNorms on the fused query and key (qk_ln: over all heads, after
# clip_qkv), other expansion ratios, an untied lm_head, a logit scale and alibi_bias_max. The
# "mpt_options" and "mosaic_gpt" fixtures are transformers' modules with those added as
# MosaicML's code computes them (a reference we write, where the library has none).


def _mpt_with_options(config, *, bias: bool, qk_ln: bool, ratio: int, tied: bool,
                      alibi_bias_max: float, logit_scale: float):
  from torch import nn  # pylint: disable=g-import-not-at-top
  from transformers.models.mpt import modeling_mpt  # pylint: disable=g-import-not-at-top
  model = transformers.MptForCausalLM(config)
  d, eps = config.d_model, config.layer_norm_epsilon
  for block in model.transformer.blocks:
    attn = block.attn
    attn.Wqkv = nn.Linear(d, 3 * d, bias=bias)
    attn.out_proj = nn.Linear(d, d, bias=bias)
    if qk_ln:
      attn.q_ln, attn.k_ln = nn.LayerNorm(d, eps=eps, bias=bias), nn.LayerNorm(d, eps=eps, bias=bias)
    block.norm_1 = nn.LayerNorm(d, eps=eps, bias=bias)
    block.norm_2 = nn.LayerNorm(d, eps=eps, bias=bias)
    block.ffn.up_proj = nn.Linear(d, ratio * d, bias=bias)
    block.ffn.down_proj = nn.Linear(ratio * d, d, bias=bias)

    def forward(self, hidden_states, position_bias, past_key_value=None, attention_mask=None):
      b, s = hidden_states.shape[:2]
      qkv = self.Wqkv(hidden_states)
      if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
      q, k, v = qkv.chunk(3, dim=2)
      if hasattr(self, "q_ln"):                    # MosaicML: norms over the whole q and k
        q, k = self.q_ln(q), self.k_ln(k)
      heads = lambda x: x.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
      q, k, v = heads(q), heads(k), heads(v)
      scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
      scores = scores + position_bias[:, -s:, -s:]
      scores = scores.masked_fill(attention_mask, torch.finfo(q.dtype).min)
      weights = nn.functional.softmax(scores.float(), dim=-1).to(v.dtype)
      context = torch.matmul(weights, v).permute(0, 2, 1, 3).reshape(b, s, -1)
      return self.out_proj(context), weights, (k, v)
    attn.forward = types.MethodType(forward, attn)
  model.transformer.norm_f = nn.LayerNorm(d, eps=eps, bias=bias)
  model.transformer.build_mpt_alibi_tensor = (
      lambda heads, length, alibi_bias_max=8, device=None: modeling_mpt.build_mpt_alibi_tensor(
          heads, length, alibi_bias, device))
  alibi_bias = alibi_bias_max
  if tied:
    model.tie_weights()
  else:
    model.lm_head = nn.Linear(d, config.vocab_size, bias=False)
  original = model.forward

  def scaled(*args, **kwargs):
    out = original(*args, **kwargs)
    out.logits = out.logits * logit_scale
    return out
  model.forward = scaled
  return model


def _mosaic_gpt_state(model) -> dict:
  """transformers' MPT names -> MosaicGPT's (MPT-1B-RedPajama-200b)."""
  renames = (("norm_1", "ln_1"), ("norm_2", "ln_2"), ("ffn.up_proj", "mlp.mlp_up"),
             ("ffn.down_proj", "mlp.mlp_down"), ("transformer.norm_f", "transformer.ln_f"))
  out = {}
  for name, value in model.state_dict().items():
    if name == "lm_head.weight":                  # tied to transformer.wte
      continue
    for old, new in renames:
      name = name.replace(old, new)
    out[name] = value.contiguous()
  return out


def mpt_models() -> dict:
  """name -> (model, config.json to write or None: save_pretrained's)."""
  common = dict(vocab_size=VOCAB, max_seq_len=64, layer_norm_epsilon=1e-5)
  # transformers' MPT: ALiBi over 6 heads (not a power of 2: interleaved slopes), clip_qkv
  # that clips, a softmax scale of its own, tied embeddings, no biases.
  plain = transformers.MptForCausalLM(transformers.MptConfig(
      d_model=48, n_heads=6, n_layers=3, expansion_ratio=4, no_bias=True,
      attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.25, "softmax_scale": 0.3},
      **common))
  options_config = transformers.MptConfig(
      d_model=32, n_heads=4, n_layers=2, expansion_ratio=3, no_bias=False,
      tie_word_embeddings=False, logit_scale="inv_sqrt_d_model",
      attn_config={"alibi": True, "alibi_bias_max": 4, "qk_ln": True, "clip_qkv": None},
      **common)
  options = _mpt_with_options(options_config, bias=True, qk_ln=True, ratio=3, tied=False,
                              alibi_bias_max=4, logit_scale=32 ** -0.5)
  mosaic_config = transformers.MptConfig(
      d_model=32, n_heads=4, n_layers=2, expansion_ratio=4, no_bias=False,
      attn_config={"alibi": True, "alibi_bias_max": 8, "qk_ln": True}, **common)
  mosaic = _mpt_with_options(mosaic_config, bias=True, qk_ln=True, ratio=4, tied=True,
                             alibi_bias_max=8, logit_scale=1.0)
  mosaic_json = {"model_type": "mosaic_gpt", "architectures": ["MosaicGPT"], "d_model": 32,
                 "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 64,
                 "vocab_size": VOCAB, "attn_impl": "torch", "attn_qk_ln": True,
                 "attn_clip_qkv": None, "softmax_scale": None, "alibi": True,
                 "alibi_bias_max": 8, "low_precision_layernorm": True, "attn_pdrop": 0.0,
                 "resid_pdrop": 0.0, "emb_pdrop": 0.0, "init_device": "cpu",
                 "tokenizer_name": "EleutherAI/gpt-neox-20b"}
  return {"mpt": (plain, None), "mpt_options": (options, None), "mosaic_gpt": (mosaic, mosaic_json)}


def _save(name: str, model, config_json, path: str) -> None:
  if config_json is None:
    shard = {"max_shard_size": "40KB"} if name == "llama" else {}
    model.save_pretrained(path, safe_serialization=True, **shard)
    return
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  save_file(_mosaic_gpt_state(model), os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f, indent=1)


def _lazily(*builders):
  """(name, (model, config json or None)) of each builder's models, a builder run only when
  the previous one's models are done with (the random draws of earlier fixtures unchanged)."""
  for build in builders:
    for name, value in build().items():
      yield name, value if isinstance(value, tuple) else (value, None)


def main(out_dir: str) -> None:
  torch.manual_seed(0)
  tok = tokenizer()
  rng = np.random.default_rng(0)
  ids = rng.integers(2, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int64)
  mask = np.arange(ids.shape[1])[None] < np.asarray(LENGTHS)[:, None]
  ids = np.where(mask, ids, 1)
  for name, (model, config_json) in _lazily(models, mpt_models):
    model.config._attn_implementation = "eager"
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
      logits = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    path = os.path.join(out_dir, name)
    _save(name, model, config_json, path)
    tok.save(os.path.join(path, "tokenizer.json"))
    np.savez(os.path.join(path, "reference.npz"), input_ids=ids.astype(np.int32),
             attention_mask=mask, logits=logits.float().numpy())
    print(name, sum(p.numel() for p in model.parameters()), "params", file=sys.stderr)
  with open(os.path.join(out_dir, "versions.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
               "tokenizers": tokenizers.__version__}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
