r"""Host memory of an LM import: writes a random Llama-layout safetensors checkpoint of about
--size_gb (TinyLlama widths, bfloat16, sharded with an index), imports it in a fresh process
and prints JSON: checkpoint bytes, largest tensor, and the importer's peak resident memory.

  python -m flamingo_jax.tools.bench_import [--size_gb=1.0] [--workdir=DIR] [--keep]

On CPU the loaded parameters themselves live in host memory (the CPU is the device), so
the figure that shows the one-tensor-at-a-time bound is `staging_bytes` = peak after the
load - memory before it - checkpoint bytes: what the reads, transforms and transfers cost
beyond the parameters. On an accelerator the parameters go to device memory instead.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import flags
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from flamingo_jax import cli

_SIZE = flags.DEFINE_float("size_gb", 1.0, "Approximate checkpoint size in GB (bfloat16).")
_WORKDIR = cli.define_workdir("Where to write (default: a temporary folder).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoint and the import.")

# TinyLlama-1.1B widths; the layer count sets the size.
DIM, HEADS, KV_HEADS, FFW, VOCAB = 2048, 32, 4, 5632, 32000


def write_checkpoint(path: str, size_gb: float) -> int:
  """A random bfloat16 Llama checkpoint, one shard per layer; returns its layer count."""
  key = DIM // HEADS
  per_layer = 2 * (2 * DIM * DIM + 2 * DIM * KV_HEADS * key + 3 * DIM * FFW + 2 * DIM)
  layers = max(1, round((size_gb * 1e9 - 2 * 2 * VOCAB * DIM) / per_layer))
  rng = np.random.default_rng(0)
  bf16 = lambda *shape: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
  os.makedirs(path, exist_ok=True)
  weight_map = {}

  def shard(name, tensors):
    save_file(tensors, os.path.join(path, name))
    weight_map.update({t: name for t in tensors})

  shard("embed.safetensors", {"model.embed_tokens.weight": bf16(VOCAB, DIM),
                              "model.norm.weight": bf16(DIM)})
  shard("head.safetensors", {"lm_head.weight": bf16(VOCAB, DIM)})
  for i in range(layers):
    p = f"model.layers.{i}."
    shard(f"layer{i:03d}.safetensors", {
        p + "self_attn.q_proj.weight": bf16(DIM, DIM),
        p + "self_attn.k_proj.weight": bf16(KV_HEADS * key, DIM),
        p + "self_attn.v_proj.weight": bf16(KV_HEADS * key, DIM),
        p + "self_attn.o_proj.weight": bf16(DIM, DIM),
        p + "mlp.gate_proj.weight": bf16(FFW, DIM), p + "mlp.up_proj.weight": bf16(FFW, DIM),
        p + "mlp.down_proj.weight": bf16(DIM, FFW),
        p + "input_layernorm.weight": bf16(DIM), p + "post_attention_layernorm.weight": bf16(DIM)})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "hidden_size": DIM, "num_hidden_layers": layers,
               "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
               "intermediate_size": FFW, "vocab_size": VOCAB, "hidden_act": "silu",
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
               "bos_token_id": 1, "eos_token_id": 2}, f)
  return layers


def main(argv):
  del argv
  root = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_import_")
  source, output = os.path.join(root, "llama"), os.path.join(root, "imported")
  shutil.rmtree(output, ignore_errors=True)
  layers = write_checkpoint(source, _SIZE.value)
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  result = subprocess.run([sys.executable, "-m", "flamingo_jax.tools.import_weights",
                           "--kind=llama", f"--source={source}", f"--output={output}", "--json"],
                          env=env, capture_output=True, text=True)
  if result.returncode:
    sys.exit(f"import failed:\n{result.stderr[-3000:]}")
  report = json.loads(result.stdout.strip().splitlines()[-1])
  staging = report["peak_rss_after_load_bytes"] - report["rss_before_bytes"] - report["bytes"]
  print(json.dumps({
      "layers": layers, "checkpoint_bytes": report["bytes"],
      "largest_tensor_bytes": report["largest_tensor_bytes"],
      "rss_before_bytes": report["rss_before_bytes"],
      "peak_rss_after_load_bytes": report["peak_rss_after_load_bytes"],
      "peak_rss_bytes": report["peak_rss_bytes"], "staging_bytes": staging,
      "staging_over_largest_tensor": round(staging / report["largest_tensor_bytes"], 2),
      "load_seconds": report["seconds"]}))
  if not _KEEP.value:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  cli.run(main)
