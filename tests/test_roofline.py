"""The roofline estimate (training/roofline.py) on a hand-written program whose every figure
is known, and on a program XLA compiled here."""

import jax
import jax.numpy as jnp
import pytest

from flamingo_jax.training import roofline

# A 5-trip loop whose body runs a fused bf16 matmul [8, 64] x [64, 32] and a copy of the
# [8, 64] operand, then an all-reduce of the result.
PROGRAM = """HloModule m

%fused (p0: bf16[8,64], p1: bf16[64,32]) -> bf16[8,32] {
  %p0 = bf16[8,64]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  ROOT %d = bf16[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], bf16[8,64], bf16[64,32])) -> (s32[], bf16[8,64], bf16[64,32]) {
  %t = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%t), index=1
  %w = bf16[64,32]{1,0} get-tuple-element(%t), index=2
  %f = bf16[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused
  %c = bf16[8,64]{1,0} copy(%x)
  ROOT %r = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) tuple(%i, %c, %w)
}

%cond (t.1: (s32[], bf16[8,64], bf16[64,32])) -> pred[] {
  %t.1 = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: bf16[8,64], b: bf16[64,32]) -> bf16[8,64] {
  %a = bf16[8,64]{1,0} parameter(0)
  %b = bf16[64,32]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body
  %g = bf16[8,64]{1,0} get-tuple-element(%loop), index=1
  ROOT %ar = bf16[8,64]{1,0} all-reduce(%g), replica_groups={}, to_apply=%fused
}
"""


def test_every_figure_of_a_known_program():
  # Peaks of 1e6 FLOP/s and 1e6 B/s: the fused matmul (32768 FLOPs, 5632 bytes) is compute
  # bound, the copy (2048 bytes) memory bound; 5 trips (the condition's bound).
  result = roofline.estimate(PROGRAM, 1e6, 1e6)
  assert result["flops"] == 5 * 2 * 8 * 32 * 64
  assert result["bytes"] == 5 * ((8 * 32 + 8 * 64 + 64 * 32) * 2 + 2 * 8 * 64 * 2)
  assert result["compute_seconds"] == pytest.approx(5 * 32768 / 1e6)
  assert result["memory_seconds"] == pytest.approx(5 * 2048 / 1e6)
  assert result["seconds"] == pytest.approx(result["compute_seconds"] + result["memory_seconds"])
  assert result["collective_bytes"] == 2 * 8 * 64 * 2
  # Faster compute: the fusion becomes memory bound.
  assert roofline.estimate(PROGRAM, 1e12, 1e6)["seconds"] == pytest.approx(
      5 * (5632 + 2048) / 1e6)


def test_a_compiled_loop_counts_its_trips():
  def f(w, x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0].sum()
  text = jax.jit(f).lower(jnp.ones((64, 64)), jnp.ones((8, 64))).compile().as_text()
  result = roofline.estimate(text, 1e12, 1e9)
  assert result["flops"] == 3 * 2 * 8 * 64 * 64
  # At least each trip's matmul reads its weight and operand and writes its result.
  assert result["bytes"] >= 3 * (64 * 64 + 2 * 8 * 64) * 4
  assert roofline.for_device(text, "cpu") is None
  assert roofline.for_device(text, "TPU v4")["seconds"] > 0


# A scanned layer: a fusion reads layer i's [64, 32] weight out of the [4, 64, 32] stack and
# writes its [8, 32] output into slot i of a [4, 8, 32] buffer in place (a 4-trip loop).
STACKED = """HloModule s

%fused_layer (w: bf16[4,64,32], x: bf16[8,64], out: bf16[4,8,32], i: s32[]) -> bf16[4,8,32] {
  %w = bf16[4,64,32]{2,1,0} parameter(0)
  %x = bf16[8,64]{1,0} parameter(1)
  %out = bf16[4,8,32]{2,1,0} parameter(2)
  %i = s32[] parameter(3)
  %z = s32[] constant(0)
  %ws = bf16[1,64,32]{2,1,0} dynamic-slice(%w, %i, %z, %z), dynamic_slice_sizes={1,64,32}
  %wl = bf16[64,32]{1,0} bitcast(%ws)
  %d = bf16[8,32]{1,0} dot(%x, %wl), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %db = bf16[1,8,32]{2,1,0} bitcast(%d)
  ROOT %u = bf16[4,8,32]{2,1,0} dynamic-update-slice(%out, %db, %i, %z, %z)
}

%body (t: (s32[], bf16[4,64,32], bf16[8,64], bf16[4,8,32])) -> (s32[], bf16[4,64,32], bf16[8,64], bf16[4,8,32]) {
  %t = (s32[], bf16[4,64,32]{2,1,0}, bf16[8,64]{1,0}, bf16[4,8,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %w = bf16[4,64,32]{2,1,0} get-tuple-element(%t), index=1
  %x = bf16[8,64]{1,0} get-tuple-element(%t), index=2
  %o = bf16[4,8,32]{2,1,0} get-tuple-element(%t), index=3
  %f = bf16[4,8,32]{2,1,0} fusion(%w, %x, %o, %i), kind=kOutput, calls=%fused_layer
  ROOT %r = (s32[], bf16[4,64,32]{2,1,0}, bf16[8,64]{1,0}, bf16[4,8,32]{2,1,0}) tuple(%i, %w, %x, %f)
}

%cond (t.1: (s32[], bf16[4,64,32], bf16[8,64], bf16[4,8,32])) -> pred[] {
  %t.1 = (s32[], bf16[4,64,32]{2,1,0}, bf16[8,64]{1,0}, bf16[4,8,32]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: bf16[4,64,32], b: bf16[8,64], c: bf16[4,8,32]) -> bf16[4,8,32] {
  %a = bf16[4,64,32]{2,1,0} parameter(0)
  %b = bf16[8,64]{1,0} parameter(1)
  %c = bf16[4,8,32]{2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,64,32]{2,1,0}, bf16[8,64]{1,0}, bf16[4,8,32]{2,1,0}) tuple(%zero, %a, %b, %c)
  %loop = (s32[], bf16[4,64,32]{2,1,0}, bf16[8,64]{1,0}, bf16[4,8,32]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %g = bf16[4,8,32]{2,1,0} get-tuple-element(%loop), index=3
}
"""


def test_a_scanned_layer_moves_its_slices_not_the_stacks():
  """Each trip reads one layer's weight (64x32), the [8, 64] input and the index, and writes
  one [8, 32] slot: not the whole [4, 64, 32] stack in and the [4, 8, 32] buffer in and out."""
  result = roofline.estimate(STACKED, 1e12, 1e6)
  assert result["flops"] == 4 * 2 * 8 * 64 * 32
  assert result["bytes"] == 4 * ((64 * 32 + 8 * 64 + 8 * 32) * 2 + 4)


def test_a_slice_inside_a_nested_fusion_counts_as_a_slice():
  """XLA:TPU nests the weight's dynamic slice in a loop fusion inside the dot's fusion."""
  nested = STACKED.replace(
      """  %ws = bf16[1,64,32]{2,1,0} dynamic-slice(%w, %i, %z, %z), dynamic_slice_sizes={1,64,32}
  %wl = bf16[64,32]{1,0} bitcast(%ws)
""", """  %wl = bf16[64,32]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
""").replace("%fused_layer (", """%fused_slice (w.2: bf16[4,64,32], i.2: s32[]) -> bf16[64,32] {
  %w.2 = bf16[4,64,32]{2,1,0} parameter(0)
  %i.2 = s32[] parameter(1)
  %z.2 = s32[] constant(0)
  %ws.2 = bf16[1,64,32]{2,1,0} dynamic-slice(%w.2, %i.2, %z.2, %z.2), dynamic_slice_sizes={1,64,32}
  ROOT %wl.2 = bf16[64,32]{1,0} bitcast(%ws.2)
}

%fused_layer (""", 1)
  assert "fused_slice" in nested and "dynamic-slice(%w," not in nested
  assert roofline.estimate(nested, 1e12, 1e6)["bytes"] == roofline.estimate(STACKED, 1e12, 1e6)["bytes"]
  # Read whole (a use that is not a slice): the full stack counts.
  whole = STACKED.replace("ROOT %u = bf16[4,8,32]{2,1,0} dynamic-update-slice(%out, %db, %i, %z, %z)",
                          "%u = bf16[4,8,32]{2,1,0} dynamic-update-slice(%out, %db, %i, %z, %z)\n"
                          "  %s = bf16[4,64,32]{2,1,0} negate(%w)\n"
                          "  ROOT %tu = (bf16[4,8,32]{2,1,0}, bf16[4,64,32]{2,1,0}) tuple(%u, %s)")
  assert roofline.estimate(whole, 1e12, 1e6)["bytes"] > roofline.estimate(STACKED, 1e12, 1e6)["bytes"]
