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
