"""The machine a benchmark ran on, for its JSON report: figures from two hosts compare only when
these agree. The same step ran 1.27x OpenFlamingo's speed on one 2-core AMD EPYC (family 26)
and 0.79x on another (WORKSPACE "Step speed vs OpenFlamingo"), so the model name alone is
not enough: the CPU family/model numbers and the vector extensions say which core it was.
"""

import os
import platform

import jax

# Vector / matrix extensions that change which kernels XLA:CPU and PyTorch pick.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
              "amx_tile", "amx_bf16", "asimd", "sve")


def parse_cpuinfo(text: str) -> dict:
  """The first processor's model name, family and model numbers, and which of `_ISA_FLAGS`
  it has, from /proc/cpuinfo's text (x86 "flags", Arm "Features"); absent fields are left
  out."""
  fields = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      if fields:                        # a blank line ends the first processor
        break
      continue
    fields.setdefault(key.strip(), value.strip())
  out = {}
  if "model name" in fields:
    out["cpu"] = fields["model name"]
  for key, name in (("cpu family", "cpu_family"), ("model", "cpu_model")):
    if fields.get(key, "").isdigit():
      out[name] = int(fields[key])
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  out["isa"] = [flag for flag in _ISA_FLAGS if flag in flags]
  return out


def describe() -> dict:
  """{cpu, cpu_family, cpu_model, isa, cores (usable by this process), jax, jaxlib,
  xla_flags, device_kind}."""
  try:
    with open("/proc/cpuinfo") as f:
      info = parse_cpuinfo(f.read())
  except OSError:                        # not Linux
    info = {"cpu": platform.processor() or platform.machine(), "isa": []}
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count())
  return info | {"cores": cores, "jax": jax.__version__, "jaxlib": jax.lib.__version__,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "device_kind": jax.devices()[0].device_kind}
