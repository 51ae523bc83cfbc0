r"""Compile the real train step ahead of time for a TPU topology (or the local devices) and
report per-device memory, whether it fits, compiled vs analytic FLOPs, compile time and, for
a TPU chip, a roofline estimate of the step time (training/roofline.py: what it leaves out).

  python -m flamingo_jax.tools.aot_compile --config=experiments/configs/flamingo_80b.py \
      --topology=v4:8x12x16 --mesh=data=96,model=16 --json

--mode=generate compiles inference instead (inference/engine.py): media encoding, the
prefill of a --gen_context-token prompt with --gen_images images, and the per-token decode
step over a --gen_context-slot cache, for --gen_batch prompts, in --gen_dtype; memory per
chip of each:

  python -m flamingo_jax.tools.aot_compile --config=experiments/configs/flamingo_80b.py \
      --mode=generate --topology=v4:2x2x4 --mesh=data=1,model=16 --gen_batch=8 --gen_context=2048

Needs libtpu (the `tpu` extra) for TPU topologies; no TPU is needed. v4 topologies are taken
with chip_config_name="megacore" (one device per chip, as on a real v4 pod).
"""

import json
import math
import time

from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from flamingo_jax import cli
from flamingo_jax import inference, models
from flamingo_jax.training import hlo_flops
from flamingo_jax.training import roofline
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks

_CONFIG = cli.define_config()
_TOPOLOGY = flags.DEFINE_string("topology", "cpu", "TPU topology (v4:8x12x16, v5p:..., v5e:..., "
                                "v6e:...) or 'cpu' for the local devices.")
_MESH = cli.define_mesh("data=D,model=M (default: config.mesh).")
_ROUND = flags.DEFINE_bool("round_batches", False, "Round each stream's batch up to a "
                           "multiple of data x microbatches, for exploring meshes (reported); "
                           "without it a batch that does not divide is an error, as in training.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "generate"], "What to compile.")
_BATCH = flags.DEFINE_integer("gen_batch", 8, "generate: prompts decoded together.")
_CONTEXT = flags.DEFINE_integer("gen_context", 2048, "generate: cache slots = prompt length.")
_IMAGES = flags.DEFINE_integer("gen_images", 5, "generate: images per prompt.")
_DTYPE = flags.DEFINE_string("gen_dtype", "bfloat16", "generate: compute dtype.")
_JSON = cli.define_json()

GIB = 1 << 30
# HBM per chip (bytes) by device_kind, from the public TPU specs.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5e": 16 * GIB,
             "TPU v5p": 95 * GIB, "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB, "TPU v6e": 32 * GIB}


def round_batches(config, data_axis: int) -> dict[str, int]:
  """Rounds each stream's batch up to a multiple of data x microbatches (only when asked:
  --round_batches); prints each change; returns the sizes."""
  sizes = {}
  for name, spec in config.data.streams.items():
    unit = data_axis * int(config.train.microbatches.get(name, 1))
    rounded = math.ceil(spec.batch_size / unit) * unit
    if rounded != spec.batch_size:
      print(f"--round_batches: {name} batch {spec.batch_size} -> {rounded} (data={data_axis} x "
            f"microbatches={unit // data_axis})", flush=True)
    spec.batch_size = sizes[name] = rounded
  return sizes


def compile_report(config, topology: str, mesh_text: str = "",
                   round_to_mesh: bool = False) -> dict:
  """Compiles the train step for `topology` and returns the report (see module doc)."""
  devices = sharding.topology_devices(topology)
  data, model = sharding.parse_mesh(mesh_text, config.mesh.data, config.mesh.model)
  mesh = sharding.make_mesh(data, model, devices)
  data_axis = mesh.shape[sharding.DATA]
  sizes = (round_batches(config, data_axis) if round_to_mesh else
           {n: s.batch_size for n, s in config.data.streams.items()})
  start = time.perf_counter()
  setup = tasks.make_train_setup(config, mesh)
  lowered = setup.step.lower(setup.abstract_state, setup.abstract_frozen, setup.abstract_batches)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  num_devices = len(devices)
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  analytic = tasks.step_flops(config)
  # Per-device SPMD program; loops counted by trip count (XLA's cost_analysis counts a
  # scanned layer once, so its figure is reported too but is not the step's FLOPs).
  by_part = hlo_flops.breakdown(compiled.as_text())
  compiled_flops = sum(by_part.values()) * num_devices
  return {
      "topology": topology, "device_kind": kind, "devices": num_devices,
      "mesh": {"data": data_axis, "model": mesh.shape[sharding.MODEL]},
      "batch_sizes": sizes,
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "total_bytes": total,
      "total_gib": round(total / GIB, 3),
      "hbm_bytes": hbm,
      "fits": None if hbm is None else bool(total <= hbm),
      "compiled_flops_per_step": compiled_flops,
      "analytic_flops_per_step": analytic["total"],
      "compiled_over_analytic": compiled_flops / analytic["total"] if analytic["total"] else None,
      "xla_cost_analysis_flops_loops_once": float(cost.get("flops", 0.0)) * num_devices,
      "analytic_flops_by_component": analytic["by_component"],
      "compiled_flops_by_part": {k: v * num_devices for k, v in sorted(by_part.items())},
      "compile_seconds": round(seconds, 1),
      # Where the time goes: tracing the step and lowering it to StableHLO (Python, JAX),
      # then XLA's compilation for the target (libtpu).
      "trace_and_lower_seconds": round(lowered_at - start, 1),
      "xla_compile_seconds": round(seconds - (lowered_at - start), 1),
      "roofline": _roofline(compiled, kind, analytic["total"] / num_devices),
  }


def _roofline(compiled, kind: str, analytic_flops_per_device: float | None = None):
  """The step's roofline estimate per chip (training/roofline.py; None off TPU), with the MFU
  it implies for the analytic FLOPs."""
  estimate = roofline.for_device(compiled.as_text(), kind)
  if estimate is None:
    return None
  estimate = {k: (round(v, 6) if k.endswith("seconds") else v) for k, v in estimate.items()}
  if analytic_flops_per_device and estimate["seconds"]:
    peak_flops = roofline.PEAKS[kind][0]
    estimate["mfu_at_estimate"] = round(analytic_flops_per_device / estimate["seconds"]
                                        / peak_flops, 4)
  return estimate


def _memory(compiled) -> dict:
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {"argument_bytes": memory.argument_size_in_bytes,
          "output_bytes": memory.output_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
          "alias_bytes": memory.alias_size_in_bytes, "total_bytes": total,
          "total_gib": round(total / GIB, 3)}


def generate_report(config, topology: str, mesh_text: str = "", *, batch: int = 8,
                    context: int = 2048, images: int = 5, dtype: str = "bfloat16") -> dict:
  """Compiles encode, prefill and decode step for `topology`; memory per device of each."""
  devices = sharding.topology_devices(topology)
  data, model = sharding.parse_mesh(mesh_text, config.mesh.data, config.mesh.model)
  mesh = sharding.make_mesh(data, model, devices)
  sharding.check_model_fits_mesh(config.model, mesh.shape[sharding.MODEL])
  if batch % mesh.shape[sharding.DATA]:
    raise ValueError(f"--batch={batch} is not divisible by mesh data={mesh.shape[sharding.DATA]}")
  cfg = config.model
  compute = jnp.dtype(dtype)
  shapes = models.param_shapes(cfg)
  specs = sharding.param_specs(shapes, sharding.rules_for(cfg, mesh.shape[sharding.MODEL]))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, compute,
                                                          sharding=NamedSharding(mesh, s)),
                        shapes, specs, is_leaf=lambda x: isinstance(x, P))
  engine = inference.Engine(cfg, None, max_slots=context, compute_dtype=compute, mesh=mesh)
  rows = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P("data")))
  size, r = cfg.image_size, cfg.resampler
  report = {"mode": "generate", "topology": topology, "device_kind": devices[0].device_kind,
            "devices": len(devices), "mesh": dict(mesh.shape), "batch": batch,
            "context": context, "images": images, "dtype": dtype}
  start = time.perf_counter()
  encode = engine._encode.lower(params, rows((batch, images, 1, size, size, 3), jnp.uint8))  # pylint: disable=protected-access
  report["encode"] = _memory(encode.compile())
  visual = rows((batch, images, r.num_latents, r.dim), compute)
  prefill = engine._prefill.lower(params, rows((batch, context), jnp.int32),  # pylint: disable=protected-access
                                  rows((batch,), jnp.int32), visual, context).compile()
  report["prefill"] = _memory(prefill)
  cache = jax.eval_shape(lambda *a: engine._prefill_fn(*a, context), params,  # pylint: disable=protected-access
                         rows((batch, context), jnp.int32), rows((batch,), jnp.int32), visual)[1]
  cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=NamedSharding(mesh, s)),
                       cache, engine.cache_specs(cache), is_leaf=lambda x: isinstance(x, P))
  step = engine._step.lower(params, rows((batch,), jnp.int32), rows((batch,), jnp.int32),  # pylint: disable=protected-access
                            rows((batch,), jnp.int32), cache).compile()
  report["decode_step"] = _memory(step)
  report["decode_step_roofline"] = _roofline(step, devices[0].device_kind)
  report["cache_bytes_per_device"] = sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) // len(devices)
  report["compile_seconds"] = round(time.perf_counter() - start, 1)
  hbm = HBM_BYTES.get(devices[0].device_kind)
  peak = max(report[k]["total_bytes"] for k in ("encode", "prefill", "decode_step"))
  report |= {"hbm_bytes": hbm, "peak_gib": round(peak / GIB, 3),
             "fits": None if hbm is None else bool(peak <= hbm)}
  return report


def main(argv):
  del argv
  if _MODE.value == "generate":
    report = generate_report(_CONFIG.value, _TOPOLOGY.value, _MESH.value, batch=_BATCH.value,
                             context=_CONTEXT.value, images=_IMAGES.value, dtype=_DTYPE.value)
  else:
    report = compile_report(_CONFIG.value, _TOPOLOGY.value, _MESH.value, _ROUND.value)
  if _JSON.value:
    print(json.dumps(report))
    return
  for key, value in report.items():
    print(f"{key:>28}: {value}")


if __name__ == "__main__":
  cli.run(main)
