"""Tests for layers/pallas/ssd.py: the SSD kernel (interpreted on CPU, compiled on GPU/TPU) against
the token-by-token reference (outputs, final state, gradients of every input), `ssd`'s dispatch
to it, and its lowering for GPU (Triton) and TPU (Mosaic), forward and backward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.mamba2 import ssd
from layers.pallas import ssd as pallas_ssd
from tests import pallas_modes
from tests.layers.test_mamba2 import random_inputs, random_segments
from tests.numerics import rel

ARGNAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def inputs(seed, length, groups, dtype, segments, with_h0, with_D=True):
  """(args dict of ARGNAMES, segment_ids): heads 4, head_dim 3, d_state 5 (both padded to 16)."""
  arrays = random_inputs(seed, length=length, heads=4, groups=groups)
  args = {k: jnp.asarray(v, dtype) for k, v in zip(ARGNAMES, arrays)}
  args["initial_state"] = args["initial_state"] if with_h0 else None
  args["D"] = args["D"] if with_D else None
  seg = None
  if segments:
    seg = random_segments(seed + 1, 2, length)
    seg[0] = np.cumsum(np.isin(np.arange(length), [5, 16, 33]))  # changes at and off chunk edges
  return args, seg


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(args, seg, impl, chunk_size=16):
  return ssd(**args, segment_ids=seg, impl=impl, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def grads(args, seg, weights, impl, chunk_size=16):
  """Gradients of sum(y * wy) + sum(final * wf) w.r.t. every input in args."""
  def loss(args):
    y, final = ssd(**args, segment_ids=seg, impl=impl, chunk_size=chunk_size)
    return (jnp.sum(y.astype(jnp.float32) * weights[0])
            + jnp.sum(final * weights[1]))

  return jax.grad(loss)({k: v for k, v in args.items() if v is not None})


@pytest.mark.parametrize("length,groups,dtype,segments,with_h0,with_D,chunk", [
    (40, 2, jnp.float32, False, False, True, 16),  # length not a multiple of the chunk
    (64, 1, jnp.float32, True, True, True, 16),  # a multiple; resets; all heads share B, C
    (40, 4, jnp.float32, True, True, False, 64),  # one group per head; a single chunk; no D
    (40, 2, jnp.bfloat16, True, True, True, 16),
    (300, 1, jnp.bfloat16, True, True, True, 64),  # bf16 matmul operands over 5 chunks
])
def test_kernel_matches_reference(length, groups, dtype, segments, with_h0, with_D, chunk):
  args, seg = inputs(length + groups, length, groups, dtype, segments, with_h0, with_D)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  y, final = run(args, seg, "pallas", chunk)
  y_ref, final_ref = run(args, seg, "reference")
  assert y.dtype == dtype and final.dtype == jnp.float32
  assert rel(y, y_ref) < tol and rel(final, final_ref) < tol, (rel(y, y_ref), rel(final, final_ref))

  rng = np.random.default_rng(0)
  weights = (rng.normal(size=y.shape).astype(np.float32),
             rng.normal(size=final.shape).astype(np.float32))
  g, g_ref = grads(args, seg, weights, "pallas", chunk), grads(args, seg, weights, "reference")
  assert set(g) == {k for k, v in args.items() if v is not None}
  for name in g:
    assert g[name].dtype == dtype, name
    assert rel(g[name], g_ref[name]) < tol, (name, rel(g[name], g_ref[name]))


def test_auto_is_xla_on_cpu_the_kernel_elsewhere_and_unsupported_calls_are_refused():
  args, seg = inputs(0, 24, 2, jnp.float32, True, True)
  jaxpr = lambda impl: str(jax.make_jaxpr(lambda a: ssd(**a, segment_ids=seg, impl=impl))(args))
  assert jaxpr("auto") == jaxpr(pallas_modes.AUTO_IMPL)

  half = {k: v.astype(jnp.float16) for k, v in args.items()}
  assert "dtype float16" in pallas_ssd.supports(**half)
  with pytest.raises(ValueError, match="impl='pallas' does not support.*x has dtype float16"):
    ssd(**half, impl="pallas")
  # Shape-only checks, on stand-ins with .shape and .dtype.
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  big = dict(x=f32(1, 8, 1, 256), dt=f32(1, 8, 1), A=f32(1), B=f32(1, 8, 1, 256),
             C=f32(1, 8, 1, 256))
  assert "state" in pallas_ssd.supports(**big)
  long = dict(big, x=f32(1, 2**16, 1, 64), B=f32(1, 2**16, 1, 128), C=f32(1, 2**16, 1, 128))
  assert pallas_ssd.supports(**long, platform="gpu") is None
  assert "VMEM" in pallas_ssd.supports(**long, platform="tpu")
  assert "chunk_size" in pallas_ssd.supports(**long, chunk_size=0)


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_forward_and_backward(platform, lowering):
  args, seg = inputs(0, 40, 2, jnp.bfloat16, True, True)
  args = {k: v.astype(jnp.float32) if k == "dt" else v for k, v in args.items()}

  def forward(args):
    return pallas_ssd.ssd_pallas(**args, segment_ids=seg, chunk_size=16, interpret=False,
                                 platform=platform)

  def loss(args):
    y, final = forward(args)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  for f in (forward, jax.grad(loss)):
    text = jax.jit(f).trace(args).lower(lowering_platforms=(lowering,)).as_text()
    assert ("triton" if platform == "gpu" else "tpu_custom_call") in text
