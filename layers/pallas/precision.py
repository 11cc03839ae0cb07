"""Matmuls inside the Pallas kernels: bf16 operands as they are, float32 ones at float32 accuracy
without Triton's slow path.

A kernel whose inputs are bf16 gives the matmuls with them bf16 operands (the tensor cores' and
MXU's native input, as flash attention does) and accumulates in float32 (`bf16_operands`).

A float32 matmul in a kernel must agree with the float32 reference to ~1e-6 (the tests allow
1e-5). `lax.Precision.HIGHEST` does that, but in a kernel compiled by Triton it lowers to IEEE
fp32 FMA loops on the CUDA cores. Compiled for sm_90 (`scripts/sm90_compile_report.py`), the
recurrent kernels' [64, 128] operands then leave ptxas at 32 registers a thread with ~100 KB of
spill code, and their backward kernels ask for more shared memory than an H100 has (gated delta
304 KiB, SSD 320 KiB; the limit is 227 KiB). So on the GPU each float32 operand is split into a TF32
part and a TF32 remainder, x = hi + lo, and the product takes three tensor-core passes

    a @ b ~= hi_a @ hi_b + hi_a @ lo_b + lo_a @ hi_b        (`DotAlgorithmPreset.TF32_TF32_F32_X3`)

leaving out lo_a @ lo_b and the rounding of the remainders, about 2^-21 of each product. One
TF32 pass would be off by ~5e-4 (the kernels' float32 tests fail at that). The GPU driver run in
the interpreter (platform "gpu" interpreted, or "cpu", as in the CPU tests) computes the same
three passes with the split done explicitly (XLA:CPU rejects the TF32 algorithms), so those tests
check the numerics the GPU runs. TPU (compiled or interpreted): HIGHEST.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_TF32_MANTISSA_DROP = 13  # float32 keeps 23 mantissa bits, TF32 10


def _to_tf32(x: jax.Array) -> jax.Array:
  """x rounded to the nearest TF32 value (10 mantissa bits; ties away from zero), as float32."""
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  half = jnp.uint32(1 << (_TF32_MANTISSA_DROP - 1))
  mask = jnp.uint32((0xFFFFFFFF >> _TF32_MANTISSA_DROP) << _TF32_MANTISSA_DROP)
  return lax.bitcast_convert_type((bits + half) & mask, _F32)


def dot_general(a: jax.Array, b: jax.Array, dimension_numbers: Any, *, platform: str,
                interpret: Any, bf16_operands: bool = False) -> jax.Array:
  """`lax.dot_general(a, b, dimension_numbers)`, float32 result, for a kernel of `platform`
  ("gpu", "tpu", or "cpu": the GPU driver interpreted), compiled where `interpret` is falsy:
  one pass on a and b cast to bf16 if `bf16_operands`, else float32 accuracy (module
  docstring)."""
  def dot(x, y, precision):
    return lax.dot_general(x, y, dimension_numbers, precision=precision,
                           preferred_element_type=_F32)

  if bf16_operands:
    return dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), lax.Precision.DEFAULT)
  if platform == "tpu":
    return dot(a, b, lax.Precision.HIGHEST)
  if platform == "gpu" and not interpret:
    return dot(a, b, lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  hi_a, hi_b = _to_tf32(a), _to_tf32(b)
  lo_a, lo_b = _to_tf32(a - hi_a), _to_tf32(b - hi_b)
  exact = lax.Precision.HIGHEST  # products of TF32 values are exact in float32
  return dot(lo_a, hi_b, exact) + dot(hi_a, lo_b, exact) + dot(hi_a, hi_b, exact)
