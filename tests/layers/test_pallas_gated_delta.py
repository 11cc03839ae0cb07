"""Tests for layers/pallas/gated_delta.py: the gated delta rule kernels, both drivers (the GPU
chunk loop and the TPU chunk grid), against the token-by-token reference (outputs, final state,
gradients of every input); `gated_delta_rule`'s dispatch to them; their lowering for GPU (Triton)
and TPU (Mosaic), forward and backward. Where each driver runs (interpreted on CPU, compiled on its
own hardware): tests/pallas_modes.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.gated_delta import gated_delta_rule
from layers.pallas import gated_delta as kernel
from tests import pallas_modes
from tests.layers.test_gated_delta import NAMES, packed_segments, random_inputs
from tests.numerics import rel


def loss_and_grads(fn, args, seg, weights):
  """(out, final) of fn and the gradients of <out, w_out> + <final, w_final> in every input."""
  def loss(*a):
    out, final = fn(*a[:5], initial_state=a[5], segment_ids=seg, scale=0.3)
    return (jnp.sum(out.astype(jnp.float32) * weights[0]) + jnp.sum(final * weights[1]),
            (out, final))

  (_, outs), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*args)
  return outs, grads


@functools.partial(jax.jit, static_argnames=("chunk_size", "platform", "block_v", "interpret"))
def pallas_run(args, seg, weights, chunk_size, platform, block_v, interpret):
  fn = functools.partial(kernel.gated_delta_rule_pallas, chunk_size=chunk_size,
                         interpret=interpret, platform=platform, block_v=block_v)
  return loss_and_grads(fn, args, seg, weights)


@jax.jit
def reference_run(args, seg, weights):
  fn = functools.partial(gated_delta_rule, impl="reference")
  return loss_and_grads(fn, args, seg, weights)


def compare(seed, length, dtype, tol, *, segments, chunk_size, platform=None, block_v=None,
            beta_max=1.0):
  """Kernel vs reference on q/k head 1 shared by 2 value heads, dim_k 12 (padded to 16), dim_v
  32, with an initial state."""
  arrays = random_inputs(seed, batch=2, length=length, hk=1, hv=2, dk=12, dv=32,
                         beta_max=beta_max)
  args = tuple(jnp.asarray(a, dtype if i < 5 else jnp.float32) for i, a in enumerate(arrays))
  seg = jnp.asarray(packed_segments(2, length)) if segments else None
  rng = np.random.default_rng(seed + 1)
  weights = (rng.normal(size=arrays[2].shape), rng.normal(size=arrays[5].shape))
  weights = tuple(jnp.asarray(w, jnp.float32) for w in weights)
  (out, final), grads = pallas_run(args, seg, weights, chunk_size, platform, block_v,
                                   pallas_modes.interpret(platform))
  (out_r, final_r), grads_r = reference_run(args, seg, weights)
  assert out.dtype == out_r.dtype and final.dtype == jnp.float32
  errors = {"out": rel(out, out_r), "final": rel(final, final_r)}
  for name, grad, grad_r, arg in zip(NAMES, grads, grads_r, args):
    assert grad.dtype == arg.dtype, name
    errors[f"d{name}"] = rel(grad, grad_r)
  assert max(errors.values()) < tol, errors
  return errors


@pytest.mark.parametrize("length,chunk_size,platform,block_v,segments,beta_max", [
    (40, 16, None, 16, True, 1.0),  # GPU driver, 3 chunks (padded), 2 blocks of state columns
    (64, 32, None, None, False, 2.0),  # a merge of 16-blocks in T; negative eigenvalues
    (40, 32, "tpu", None, True, 1.0),  # TPU driver: chunks on the grid, state in scratch
])
def test_float32_matches_reference(length, chunk_size, platform, block_v, segments, beta_max):
  compare(0, length, jnp.float32, 1e-5, segments=segments, chunk_size=chunk_size,
          platform=platform, block_v=block_v, beta_max=beta_max)


@pytest.mark.parametrize("length,chunk_size,platform,block_v", [
    (40, 16, None, 16),  # GPU driver
    (200, 64, "tpu", None),  # TPU driver, longer: bf16 matmul operands' error does not grow
])
def test_bfloat16_inputs_match_reference(length, chunk_size, platform, block_v):
  compare(1, length, jnp.bfloat16, 1e-2, segments=True, chunk_size=chunk_size,
          platform=platform, block_v=block_v)


def test_dispatch():
  arrays = [jnp.asarray(a) for a in random_inputs(2, length=20)]
  q, k, v, g, beta, s0 = arrays
  run = jax.jit(gated_delta_rule, static_argnames=("impl", "chunk_size"))
  # "auto" is the XLA form on CPU, the kernel on GPU/TPU, bit for bit.
  for got, want in zip(run(*arrays[:5], initial_state=s0, impl="auto"),
                       run(*arrays[:5], initial_state=s0, impl=pallas_modes.AUTO_IMPL)):
    np.testing.assert_array_equal(got, want)
  # "pallas" runs the kernel (compiled on GPU/TPU, interpreted on CPU).
  out, final = run(*arrays[:5], initial_state=s0, impl="pallas", chunk_size=16)
  out_r, final_r = run(*arrays[:5], initial_state=s0, impl="reference")
  assert rel(out, out_r) < 1e-5 and rel(final, final_r) < 1e-5
  # Unsupported calls: a reason from `supports`, a ValueError naming it from impl="pallas".
  assert "chunk_size" in kernel.supports(q, k, v, g, beta, chunk_size=48)
  assert "dim_k" in kernel.supports(*(jnp.zeros((1, 4, 1, 512)),) * 2, v[:1, :4, :1],
                                    g[:1, :4, :1], beta[:1, :4, :1])
  assert kernel.supports(q, k, v.astype(jnp.bfloat16), g, beta, s0) is None
  with pytest.raises(ValueError, match="chunk_size"):
    gated_delta_rule(*arrays[:5], impl="pallas", chunk_size=48)
  with jax.enable_x64(True):
    q64 = jnp.asarray(q, jnp.float64)
    assert "float64" in kernel.supports(q64, k, v, g, beta)
    with pytest.raises(ValueError, match="float64"):
      gated_delta_rule(q64, k, v, g, beta, impl="pallas")


@pytest.mark.parametrize("platform,lowering_platform,target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_forward_and_backward(platform, lowering_platform, target):
  # Lowering only (no compile): catches primitives or block shapes a backend cannot take.
  batch, length, hk, hv, dk, dv = 2, 200, 2, 4, 128, 256
  spec = jax.ShapeDtypeStruct
  args = (spec((batch, length, hk, dk), jnp.bfloat16), spec((batch, length, hk, dk), jnp.bfloat16),
          spec((batch, length, hv, dv), jnp.bfloat16), spec((batch, length, hv), jnp.float32),
          spec((batch, length, hv), jnp.float32), spec((batch, hv, dk, dv), jnp.float32),
          spec((batch, length), jnp.int32))

  def forward(q, k, v, g, beta, s0, seg):
    return kernel.gated_delta_rule_pallas(q, k, v, g, beta, initial_state=s0, segment_ids=seg,
                                          interpret=False, platform=platform)

  def loss(*a):
    out, final = forward(*a)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

  for fn in (forward, jax.grad(loss, argnums=range(6))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering_platform,)).as_text()
    assert text.count(f"custom_call @{target}") == (1 if fn is forward else 2)
