r"""Benchmark the train step on the local devices: steps/s, tokens/s, examples/s, TFLOP/s and
model-FLOPs utilisation (analytic FLOPs / step time / chip peak). A benchmark, not a test.

  python -m flamingo_jax.tools.bench_step --config=experiments/configs/tiny.py --steps=20
  python -m flamingo_jax.tools.bench_step --config=experiments/configs/bench.py:1b \
      --peak_tflops=989 --config.model.attention_impl=cudnn --profile_dir=/tmp/prof --json

--profile_dir writes a jax.profiler trace of the timed steps (TensorBoard's profile plugin or
Perfetto) and the compiled step's HLO (compiled_step.hlo.txt) there, and adds
"profile_ms_per_step": the op time of each model part, forward and backward, and of the
update (training/profile_parts.py). --config.model.attention_impl picks the attention kernel
(models/attention.py). "host" says which machine ran it (flamingo_jax/host.py): compare
figures only between runs whose hosts agree.
"""

import json
import os
import time

from absl import flags
import jax

from flamingo_jax import cli
from flamingo_jax.data import schema
from flamingo_jax import host
from flamingo_jax.training import profile_parts
from flamingo_jax.training import tasks
from flamingo_jax.training import train_step

_CONFIG = cli.define_config()
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile + warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for MFU (0: skip). "
                           "H100 SXM dense bf16: 989.")
_JSON = cli.define_json()
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed "
                                   "steps here.")


def benchmark(config, steps: int, peak_tflops: float = 0.0, profile_dir: str = "") -> dict:
  setup = tasks.make_train_setup(config)
  start = time.perf_counter()
  state, frozen = setup.init(jax.random.key(config.seed))
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - start
  batches = [train_step.put_batches(setup, schema.random_batches(config, seed=i)) for i in range(2)]
  start = time.perf_counter()
  # Compiled once, ahead of time: the timed steps run it and --profile_dir reads its HLO.
  step = setup.step.lower(state, frozen, batches[0]).compile()
  state, metrics = step(state, frozen, batches[0])
  jax.block_until_ready(metrics)
  first_seconds = time.perf_counter() - start
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, frozen, batches[i % 2])
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  if profile_dir:
    jax.profiler.stop_trace()
    # The trace names the compiled module's instructions; their op_names name the parts.
    hlo_text = step.as_text()
    with open(os.path.join(profile_dir, "compiled_step.hlo.txt"), "w") as f:
      f.write(hlo_text)
  streams = config.data.streams
  tokens = sum(s.batch_size * s.max_tokens for s in streams.values())
  examples = sum(s.batch_size for s in streams.values())
  analytic = tasks.step_flops(config)["total"]
  devices = jax.device_count()
  tflops_per_device = analytic / seconds / devices / 1e12
  report = {
      "device_kind": jax.devices()[0].device_kind, "devices": devices,
      "params": tasks.task_of(config).count_params(config.model)["total"],
      "init_seconds": round(init_seconds, 2),
      "first_step_seconds (compile)": round(first_seconds, 2),
      "step_seconds": seconds, "steps_per_sec": 1 / seconds,
      "tokens_per_sec": tokens / seconds, "examples_per_sec": examples / seconds,
      "analytic_tflops_per_step": analytic / 1e12,
      "tflops_per_sec_per_device": tflops_per_device,
      "loss": float(metrics["loss"]),
      "attention_impl": config.model.get("attention_impl", "einsum"),
      "host": host.describe(),
  }
  if peak_tflops:
    report["mfu"] = tflops_per_device / peak_tflops
  if profile_dir:
    report["profile_ms_per_step"] = profile_parts.summarize_dir(profile_dir, hlo_text, steps)
  return report


def main(argv):
  del argv
  report = benchmark(_CONFIG.value, _STEPS.value, _PEAK.value, _PROFILE_DIR.value)
  if _JSON.value:
    print(json.dumps(report))
  else:
    for key, value in report.items():
      print(f"{key:>30}: {value:.6g}" if isinstance(value, float) else f"{key:>30}: {value}")


if __name__ == "__main__":
  cli.run(main)
