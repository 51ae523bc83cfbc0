"""Compiled-FLOPs counting (hlo_flops), the spreading of the frozen encoder's batch, and the
per-part reading of a profiled step (training/profile_parts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flamingo_jax.training import hlo_flops
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step


def test_scanned_matmuls_are_counted_by_trip_count():
  def f(x, ws):                       # 7 layers of [4, 32] @ [32, 32] under scan
    return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]
  compiled = jax.jit(f).lower(jnp.zeros((4, 32)), jnp.zeros((7, 32, 32))).compile()
  assert hlo_flops.count(compiled.as_text()) == 7 * 2 * 4 * 32 * 32


def test_trip_count_from_the_loop_condition_when_xla_drops_it():
  """TPU executables carry no known_trip_count: the bound comes from `i < N`."""
  hlo = """
%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %w = f32[8,8] constant({...})
  %h = f32[4,8] get-tuple-element(%p), index=1
  %d = f32[4,8] dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%p, %d)
}

%cond (q: (s32[], f32[4,8])) -> pred[] {
  %c = s32[]{:T(128)} constant(12)
  %q = (s32[], f32[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %x = f32[4,8] parameter(0)
  %init = (s32[], f32[4,8]) tuple(%x, %x)
  %loop = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4,8] get-tuple-element(%loop), index=1
}
"""
  assert hlo_flops.count(hlo) == 12 * 2 * 4 * 8 * 8


def test_vision_batch_is_spread_over_every_device_and_padded():
  """data=2 x model=4, 6 frames per data shard (padded to 8): each device encodes 2 frames,
  and the result equals encoding all frames in one place."""
  mesh = sharding.make_mesh(2, 4)
  batching = train_step.spread_vision_batch(mesh)
  weights = jnp.asarray(np.random.RandomState(0).randn(16, 16), jnp.float32)
  encode = lambda frames: frames @ weights                         # [BNT, 16] -> [BNT, 16]
  frames = jnp.asarray(np.random.RandomState(1).randn(12, 16), jnp.float32)
  frames = jax.device_put(frames, NamedSharding(mesh, P("data")))
  spread = jax.jit(lambda f: batching(encode, f))
  np.testing.assert_allclose(spread(frames), encode(frames), rtol=1e-6)
  per_device = hlo_flops.count(spread.lower(frames).compile().as_text())
  assert per_device == 2 * 16 * 16 * 2                             # 2 frames per device


def test_grouped_convolution_as_tpu_writes_it():
  """TPU: a 2-group 3x3 conv (8 -> 16 channels per group) as a dense conv over a group
  dimension of window 2 with lhs_dilate 2: only the taps on real inputs count."""
  hlo = """
ENTRY %main (x: f32[1,4,4,2,8], w: f32[3,3,8,2,16]) -> f32[1,4,4,2,16] {
  %x = f32[1,4,4,2,8] parameter(0)
  %w = f32[3,3,8,2,16] parameter(1)
  ROOT %c = f32[1,4,4,2,16]{4,3,2,1,0} convolution(%x, %w), window={size=3x3x2 pad=1_1x1_1x0_0 lhs_dilate=1x1x2}, dim_labels=b012f_01i2o->b012f
}
"""
  outputs, taps = 4 * 4 * 2 * 16, 3 * 3 * 8           # per output: 3x3 window x 8 inputs
  assert hlo_flops.count(hlo) == 2 * outputs * taps


# -- training/profile_parts: where a profiled step's time goes ---------------------------------

def test_profile_parts_names_each_op_by_model_part_and_direction():
  from flamingo_jax.training import profile_parts  # pylint: disable=g-import-not-at-top
  step = "jit(step_fn)/"
  assert profile_parts.part_of(
      step + "jvp(flamingo)/encode_media/flamingo/vision_encoder/stem/conv") == \
      "vision_encoder forward"
  assert profile_parts.part_of(
      step + "transpose(jvp(flamingo))/encode_media/flamingo/perceiver_resampler/while/body/"
      "closed_call/ffw/ffw_out/dot_general") == "perceiver_resampler backward"
  lm = step + "jvp(flamingo)/decode/flamingo/language_model/while/body/closed_call/"
  assert profile_parts.part_of(lm + "blocks/while/body/closed_call/block/ffw/dot") == \
      "language_model forward"
  assert profile_parts.part_of(lm + "xattn/ffw/ffw_in/dot_general") == "gated_xattn forward"
  assert profile_parts.part_of(lm.replace("jvp(", "transpose(jvp(") + "tail_xattn/attn/dot") \
      == "gated_xattn backward"
  assert profile_parts.part_of(step + "adam/mul") == "update"


def test_profile_parts_sums_trace_events_per_part_and_step():
  from flamingo_jax.training import profile_parts  # pylint: disable=g-import-not-at-top
  hlo = ('  %fusion.1 = f32[2]{0} fusion(%p), metadata={op_name="jit(f)/jvp(m)/vision_encoder/conv"}\n'
         '  ROOT %dot.7 = f32[2]{0} dot(%a, %b), metadata={op_name="jit(f)/transpose(jvp(m))/vision_encoder/dot"}\n'
         '  %add.3 = f32[2]{0} add(%a, %b), metadata={op_name="jit(f)/adam/add"}\n')
  trace = {"traceEvents": [
      {"ph": "X", "name": "fusion.1", "dur": 3000.0},
      {"ph": "X", "name": "fusion.1", "dur": 1000.0},
      {"ph": "X", "name": "kernel_abc", "dur": 600.0, "args": {"hlo_op": "dot.7"}},   # GPU form
      {"ph": "X", "name": "add.3", "dur": 200.0},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000.0},                  # not an op
      {"ph": "i", "name": "fusion.1", "dur": 7000.0}]}                               # not complete
  assert profile_parts.summarize(trace, hlo, steps=2) == {
      "vision_encoder forward": 2.0, "vision_encoder backward": 0.3, "update": 0.1}


def test_profile_parts_reads_a_real_cpu_trace(tmp_path):
  """A profiled jitted gradient on this backend: its ops are found and named by part."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import profile_parts  # pylint: disable=g-import-not-at-top

  def loss(w, x):
    with jax.named_scope("perceiver_resampler"):
      return jnp.sum(jnp.tanh(x @ w) ** 2)
  step = jax.jit(jax.grad(loss))
  w, x = jnp.ones((256, 256)) * 0.01, jnp.ones((64, 256))
  step(w, x).block_until_ready()
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(2):
    step(w, x).block_until_ready()
  jax.profiler.stop_trace()
  parts = profile_parts.summarize_dir(str(tmp_path), step.lower(w, x).compile().as_text(), 2)
  assert parts.get("perceiver_resampler forward", 0) > 0, parts
  assert parts.get("perceiver_resampler backward", 0) > 0, parts
  with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz under"):
    profile_parts.trace_file(str(tmp_path / "empty"))


# -- flamingo_jax/host: which machine a benchmark ran on ---------------------------------------------

def test_host_reads_the_first_processor_of_cpuinfo():
  from flamingo_jax import host  # pylint: disable=g-import-not-at-top
  x86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
         "model name\t: AMD EPYC 9B45\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 vaes\n\n"
         "processor\t: 1\ncpu family\t: 25\nmodel name\t: other\nflags\t\t: amx_tile\n")
  assert host.parse_cpuinfo(x86) == {"cpu": "AMD EPYC 9B45", "cpu_family": 26, "cpu_model": 2,
                                     "isa": ["avx2", "fma", "avx512f", "avx512_bf16"]}
  arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve sha3\nCPU part\t: 0xd4f\n"
  assert host.parse_cpuinfo(arm) == {"isa": ["asimd", "sve"]}
  described = host.describe()
  assert described["cores"] >= 1 and described["jax"] == jax.__version__
