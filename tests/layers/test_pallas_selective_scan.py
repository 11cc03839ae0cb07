"""Tests for layers/pallas/selective_scan.py: the kernel (interpreted on CPU, compiled on GPU/TPU)
against the selective scan's reference implementation, forward and gradients, float32 and bf16;
dispatch; lowering for GPU (Triton) and TPU (Mosaic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import mamba
from layers.mamba import selective_scan
from layers.pallas import dispatch
from layers.pallas import selective_scan as kernel
from tests import pallas_modes
from tests.numerics import rel

DIFF_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def scan_inputs(seed, batch, length, channels, state, dtype=jnp.float32, groups=None):
  """Random arguments in the Mamba mixer's layout (B, C [batch, length, state])."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  bc = (batch, length, state) if groups is None else (batch, length, groups, state)
  args = dict(
      u=normal(batch, length, channels), delta=normal(batch, length, channels) - 1.0,
      A=-np.exp(rng.uniform(-1, 1.5, (channels, state))).astype(np.float32),
      B=normal(*bc), C=normal(*bc), D=normal(channels), z=normal(batch, length, channels),
      delta_bias=0.5 * normal(channels), initial_state=normal(batch, channels, state))
  args = {k: jnp.asarray(v, dtype) for k, v in args.items()}
  seg = np.zeros((batch, length), np.int32)  # resets in both rows, one at a chunk start
  seg[0, length // 3:] = 1
  seg[-1, 16:] = 1
  seg[-1, length - 5:] = 2
  return args, jnp.asarray(seg)


def run(impl, args, seg, chunk_size=None):
  """(y, final state, gradients of a random projection of both w.r.t. DIFF_ARGS)."""
  rng = np.random.default_rng(99)
  out = jax.eval_shape(lambda: selective_scan(**args, delta_softplus=True, segment_ids=seg,
                                              impl="xla"))
  wy, wh = (jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in out)

  def loss(diff):
    y, h = selective_scan(**diff, delta_softplus=True, segment_ids=seg, impl=impl,
                          chunk_size=chunk_size)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh), (y, h)

  grads, (y, h) = jax.grad(loss, has_aux=True)(args)
  return y, h, grads


@pytest.mark.parametrize("length, chunk_size", [(40, None), (64, 8)])
def test_pallas_matches_reference_float32(length, chunk_size):
  # 40 channels: two channel blocks of 32 on CPU, the second padded; 5 states padded to 8;
  # length 40 is 2.5 chunks of 16, length 64 eight chunks of 8.
  args, seg = scan_inputs(length, 2, length, 40, 5)
  y_r, h_r, g_r = run("reference", args, seg)
  y_p, h_p, g_p = run("pallas", args, seg, chunk_size)
  assert rel(y_p, y_r) < 1e-5
  assert rel(h_p, h_r) < 1e-5
  for k in DIFF_ARGS:
    assert rel(g_p[k], g_r[k]) < 1e-5, k


def test_pallas_matches_reference_bfloat16():
  args, seg = scan_inputs(7, 2, 40, 8, 4, jnp.bfloat16)
  y_r, h_r, g_r = run("reference", args, seg)
  y_p, h_p, g_p = run("pallas", args, seg)
  assert y_p.dtype == jnp.bfloat16 and h_p.dtype == jnp.float32
  assert rel(y_p, y_r) < 1e-2
  assert rel(h_p, h_r) < 1e-2
  for k in DIFF_ARGS:
    assert rel(g_p[k], g_r[k]) < 1e-2, k


def test_auto_is_xla_on_cpu_the_kernel_elsewhere_and_unsupported_calls_name_the_reason():
  args, seg = scan_inputs(1, 1, 12, 4, 3)
  y_a, h_a = selective_scan(**args, segment_ids=seg, impl="auto")
  y_x, h_x = selective_scan(**args, segment_ids=seg, impl=pallas_modes.AUTO_IMPL)
  np.testing.assert_array_equal(y_a, y_x)
  np.testing.assert_array_equal(h_a, h_x)

  grouped, _ = scan_inputs(1, 1, 12, 4, 3, groups=2)
  prepared = mamba._prepare(grouped["u"], grouped["delta"], grouped["A"], grouped["B"],
                            grouped["C"], None, None, None, False, None, None)
  u, delta, A, B, C, _, _, h0, reset = prepared
  assert "grouped B" in kernel.supports(u, delta, A, B, C, h0, reset, None)
  assert "time-invariant C" in kernel.supports(u, delta, A, B[:, :, :1], jnp.ones((4, 3)), h0,
                                               reset, None)
  assert "chunk_size" in kernel.supports(u, delta, A, B[:, :, :1], C[:, :, :1], h0, reset, 65)
  with pytest.raises(ValueError, match="grouped B"):
    selective_scan(**grouped, impl="pallas")
  # The unsupported call still runs under "auto" (the XLA form).
  selective_scan(**grouped, impl="auto")


def test_auto_picks_pallas_on_accelerators_where_supported(monkeypatch):
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  call = lambda length: (shape(2, length, 256), shape(2, length, 256), shape(256, 16),
                         shape(2, length, 1, 16), shape(2, length, 1, 16), shape(2, 256, 16),
                         shape(2, length), None)
  for platform in ("gpu", "tpu"):
    monkeypatch.setattr(dispatch, "platform", lambda: platform)
    assert dispatch.resolve("selective_scan", "auto", lambda: kernel.supports(*call(2048))) \
        == "pallas"
  # On TPU a program keeps its whole sequence in VMEM: too long a one falls back to "xla".
  assert "VMEM" in kernel.supports(*call(1 << 16))
  assert dispatch.resolve("selective_scan", "auto",
                          lambda: kernel.supports(*call(1 << 16))) == "xla"


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_forward_and_backward(platform, lowering):
  args, seg = scan_inputs(2, 2, 40, 40, 5)
  u, delta, A, B, C, _, _, h0, reset = mamba._prepare(
      args["u"], args["delta"], args["A"], args["B"], args["C"], None, None, None, True,
      args["initial_state"], seg)

  def f(u, delta, A, B, C, h0):
    return kernel.selective_scan_pallas(u, delta, A, B, C, h0, reset, None, interpret=False,
                                        platform=platform)

  def loss(*a):
    y, h = f(*a)
    return jnp.sum(y) + jnp.sum(h)

  for fn in (f, jax.grad(loss, argnums=range(6))):
    text = jax.jit(fn).trace(u, delta, A, B, C, h0).lower(
        lowering_platforms=(lowering,)).as_text()
    assert ("__gpu$xla.gpu.triton" if platform == "gpu" else "tpu_custom_call") in text
