"""What a run writes as it goes: metrics.jsonl and TensorBoard (process 0) and one console
line per logged step; MFU against the chip's peak."""

import copy
import json
import os
from typing import Any

from etils import epath
import jax
import tensorflow as tf

from flamingo_jax.training import checkpointing

# Dense bf16 peak TFLOP/s of one JAX device, by device_kind prefix (for MFU).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
               "NVIDIA A100": 312.0}


def peak_tflops(config: Any) -> float:
  if config.train.peak_tflops_per_device:
    return float(config.train.peak_tflops_per_device)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), 0.0)


class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0) and a console line."""

  def __init__(self, workdir: str, total_steps: int, ckpt: checkpointing.Checkpointer,
               start_step: int):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._ckpt = ckpt
    self._tb = None
    self._skips_shown = {}
    self.rewind(start_step)
    if self.enabled:
      tf.config.set_visible_devices([], "GPU")
      self._tb = tf.summary.create_file_writer(self.tb_dir)

  def write(self, record: dict, eta_seconds: float) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")     # floats: repr precision
    with self._tb.as_default(step=record["step"]):
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          tf.summary.scalar(key, value)
    self._tb.flush()
    streams = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss/"))
    mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
    print(f"step {record['step']:>6}/{self.total} loss {record['loss']:.4f} [{streams}] "
          f"{record['tokens_per_sec']:.0f} tok/s{mfu} eta {_duration(eta_seconds)}", flush=True)

  def rewind(self, step: int) -> None:
    """Rows of steps after `step` (they are about to be run again) go to moved_aside/, so
    that metrics.jsonl holds each step once."""
    if not self.enabled or not self.path.exists():
      return
    rows = self.path.read_text().splitlines(keepends=True)
    later = [r for r in rows if r.strip() and json.loads(r)["step"] > step]
    if not later:
      return
    kept = epath.Path(str(self.path) + ".tmp")
    kept.write_text("".join(r for r in rows if r.strip() and json.loads(r)["step"] <= step))
    epath.Path(self._ckpt.aside_directory).mkdir(parents=True, exist_ok=True)
    epath.Path(self._ckpt.aside_path(f"metrics-after-step-{step}", ".jsonl")).write_text(
        "".join(later))
    kept.replace(self.path)

  def show_skips(self, skipped: dict[str, dict[str, int]]) -> None:
    """One console line when the skip counts changed since the last one."""
    if not self.enabled:
      return
    parts = [f"{name} " + ", ".join(f"{reason} {count}" for reason, count in sorted(c.items()))
             for name, c in sorted(skipped.items()) if c]
    if parts and skipped != self._skips_shown:
      print(f"  skipped examples: {'; '.join(parts)}", flush=True)
    self._skips_shown = copy.deepcopy(skipped)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
