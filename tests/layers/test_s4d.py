"""Tests for layers/s4d.py (S4D) against float64 numpy references built from the definitions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from layers.s4d import S4D, s4d_discretize, s4d_inv_init, s4d_kernel, s4d_lin_init


def rel(out, ref) -> float:
  out, ref = np.asarray(out), np.asarray(ref)
  dtype = np.complex128 if np.iscomplexobj(out) or np.iscomplexobj(ref) else np.float64
  out, ref = out.astype(dtype), ref.astype(dtype)
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert np.isfinite(err), "NaN/Inf in output"
  return float(err)


def tree_rel(out, ref) -> float:
  return max(rel(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


def random_ssm(rng, h, n2, channels=1):
  """Random stable continuous SSM parameters as numpy complex128."""
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), h))
  A = -rng.uniform(0.1, 1.0, (h, n2)) + 1j * rng.uniform(0, 3 * n2, (h, n2))
  B = rng.normal(size=(h, n2)) + 1j * rng.normal(size=(h, n2))
  C = rng.normal(size=(channels, h, n2)) + 1j * rng.normal(size=(channels, h, n2))
  return dt, A, B, C


def kernel_by_matrix_powers(dt, A, B, C, length):
  """K[c, l, h] = 2 Re(C dA^l dB) with dA the explicit diagonal matrix, float64."""
  channels, h, n2 = C.shape
  out = np.zeros((channels, length, h))
  for hh in range(h):
    dA = np.diag(np.exp(dt[hh] * A[hh]))
    dB = (np.exp(dt[hh] * A[hh]) - 1) / A[hh] * B[hh]
    power = np.eye(n2, dtype=np.complex128)
    for l in range(length):
      for c in range(channels):
        out[c, l, hh] = 2 * np.real(C[c, hh] @ power @ dB)
      power = power @ dA
  return out


# ----------------------------------------------------------------------------- pure functions


def test_lin_and_inv_init_match_paper_formulas():
  for n_state in (2, 8, 64):
    lin, inv = s4d_lin_init(n_state), s4d_inv_init(n_state)
    assert lin.shape == inv.shape == (n_state // 2,)
    for n in range(n_state // 2):
      assert lin[n] == pytest.approx(complex(-0.5, np.pi * n), rel=1e-14, abs=1e-14)
      assert inv[n] == pytest.approx(
          complex(-0.5, n_state / np.pi * (n_state / (2 * n + 1) - 1)), rel=1e-14, abs=1e-14)
  with pytest.raises(ValueError, match="d_state must be an even"):
    s4d_lin_init(7)


def test_discretize_is_zoh():
  rng = np.random.default_rng(0)
  dt, A, B, _ = random_ssm(rng, 3, 4)
  dA, dB = s4d_discretize(jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.complex64),
                          jnp.asarray(B, jnp.complex64))
  # ZOH: dB = int_0^dt exp(tau A) dtau * B, here by a fine midpoint rule.
  taus = (np.arange(4000) + 0.5) / 4000
  integral = np.stack([np.mean(np.exp(np.outer(dt[i] * taus, A[i])), 0) * dt[i] for i in range(3)])
  assert rel(dA, np.exp(dt[:, None] * A)) < 1e-6
  assert rel(dB, integral * B) < 1e-6


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_kernel_matches_powers_of_discrete_state_matrix(chunk_size):
  rng = np.random.default_rng(1)
  length = 37  # not a multiple of the chunk size
  dt, A, B, C = random_ssm(rng, 3, 5, channels=2)
  ref = kernel_by_matrix_powers(dt, A, B, C, length)
  with jax.enable_x64(True):
    k64 = s4d_kernel(jnp.asarray(dt), jnp.asarray(A), jnp.asarray(B), jnp.asarray(C), length,
                     chunk_size=chunk_size)
    assert k64.dtype == jnp.float64
    assert rel(k64, ref) < 1e-12
  k32 = s4d_kernel(jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.complex64),
                   jnp.asarray(B, jnp.complex64), jnp.asarray(C, jnp.complex64), length,
                   chunk_size=chunk_size)
  assert k32.shape == (2, length, 3) and k32.dtype == jnp.float32
  # float32 phases l*dt*Im(A) reach ~1e2 rad here, so the kernel carries ~1e2 * 6e-8 absolute
  # phase error: a few 1e-6 relative.
  assert rel(k32, ref) < 1e-5
  k1 = s4d_kernel(jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.complex64),
                  jnp.asarray(B, jnp.complex64), jnp.asarray(C[0], jnp.complex64), length)
  assert k1.shape == (length, 3) and rel(k1, ref[0]) < 1e-5


# ----------------------------------------------------------------------------- module helpers

H, NSTATE = 4, 8


def randn(seed, shape):
  # numpy, not jax.random: each new shape would compile a threefry program (~1 s on this CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


L = 16  # most tests share shapes so that compiled functions are reused (2 shared CPU cores)


@functools.partial(jax.jit, static_argnums=0)
def init(m, key, x):
  return m.init(key, x)


@functools.partial(jax.jit, static_argnums=0)
def apply(m, params, x, segment_ids=None, cache=None):
  return m.apply(params, x, segment_ids=segment_ids, cache=cache)


@functools.partial(jax.jit, static_argnums=0)
def jacobian(m, params, x, segment_ids=None):
  """[i, j] = max over channels of |d y[0, i] / d x[0, j]| (first example of the batch)."""
  jac = jax.jacrev(lambda xx: m.apply(params, xx, segment_ids=segment_ids)[0])(x)
  return jnp.abs(jac[0, :, :, 0]).max(axis=(1, 3))


def make(seed=0, length=L, batch=2, **kw):
  m = S4D(d_model=H, d_state=NSTATE, **kw)
  x = randn(seed, (batch, length, H))
  return m, init(m, jax.random.key(seed + 100), x), x


def numpy_layer(params, x, bidirectional=False):
  """The full S4D layer in float64 numpy, straight from the definition (direct sums)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  dt = np.exp(p["log_dt"])
  A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
  B = p["B"][..., 0] + 1j * p["B"][..., 1]
  C = p["C"][..., 0] + 1j * p["C"][..., 1]
  u = np.asarray(x, np.float64)
  length = u.shape[1]
  K = kernel_by_matrix_powers(dt, A, B, C, length)
  y = np.zeros_like(u)
  for t in range(length):
    for s in range(length):
      if s <= t:
        y[:, t] += K[0, t - s] * u[:, s]
      elif bidirectional:
        y[:, t] += K[1, s - t - 1] * u[:, s]
  y = y + p["D"] * u
  y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # exact GELU
  z = y @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
  return z[..., :H] / (1 + np.exp(-z[..., H:]))  # GLU: a * sigmoid(b)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_conv_and_recurrent_modes_match_numpy_definition(bidirectional):
  m, params, x = make(bidirectional=bidirectional)
  ref = numpy_layer(params, x, bidirectional)
  y, cache = apply(m, params, x)
  assert cache is None
  assert rel(y, ref) < 1e-5
  y_rec, cache = apply(m, params, x, jnp.full(x.shape[:2], 3, jnp.int32))
  assert cache is None
  assert rel(y_rec, ref) < 1e-5


def test_init_ranges():
  m = S4D(d_model=64, d_state=16, dt_min=2e-3, dt_max=5e-2)
  params = init(m, jax.random.key(0), jnp.ones((1, 4, 64)))["params"]
  dt = np.exp(np.asarray(params["log_dt"]))
  assert dt.min() >= 2e-3 * (1 - 1e-6) and dt.max() <= 5e-2 * (1 + 1e-6)
  # log-uniform: log dt spread over the interval, not clumped at one end
  assert np.ptp(np.log(dt)) > 0.7 * (np.log(5e-2) - np.log(2e-3))
  a_real = -np.exp(np.asarray(params["log_A_real"]))
  assert (a_real < 0).all() and np.allclose(a_real, -0.5)
  np.testing.assert_allclose(np.asarray(params["A_imag"])[5], np.pi * np.arange(8), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(params["B"])[..., 0], 1.0)
  np.testing.assert_allclose(np.asarray(params["B"])[..., 1], 0.0)
  c = np.asarray(params["C"])
  assert c.shape == (1, 64, 8, 2)
  assert 0.8 < np.mean(np.sum(c ** 2, -1)) < 1.2  # E|C|^2 = 1 for 512 samples
  inv = init(S4D(d_model=3, d_state=16, a_init="inv"), jax.random.key(1), jnp.ones((1, 4, 3)))
  np.testing.assert_allclose(np.asarray(inv["params"]["A_imag"])[2], np.imag(s4d_inv_init(16)),
                             rtol=1e-6)
  assert S4D.ssm_param_names == ("log_dt", "log_A_real", "A_imag", "B")


def test_bad_fields_raise_clear_errors():
  x = jnp.ones((1, 4, 3))
  with pytest.raises(ValueError, match="S4D.a_init='foo'"):
    S4D(d_model=3, a_init="foo").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="S4D.activation='bar'"):
    S4D(d_model=3, activation="bar").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="d_state must be an even"):
    S4D(d_model=3, d_state=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"needs x \[batch, length, 3\]"):
    S4D(d_model=3).init(jax.random.key(0), jnp.ones((1, 4, 5)))


def stream(m, params, x, sizes, segment_ids=None):
  """Feed x through the cache in chunks of the given sizes; returns the concatenated outputs."""
  cache = m.init_cache(x.shape[0], x.dtype)
  outs, start = [], 0
  for size in sizes:
    seg = None if segment_ids is None else segment_ids[:, start:start + size]
    y, cache = apply(m, params, x[:, start:start + size], seg, cache)
    assert cache["state"].dtype == jnp.complex64 and cache["state"].shape == (x.shape[0], H, 4)
    outs.append(y)
    start += size
  assert start == x.shape[1]
  return jnp.concatenate(outs, axis=1), cache


def test_conv_equals_streaming_and_recurrent_modes():
  m, params, x = make(seed=1)
  y_conv, _ = apply(m, params, x)
  y_tok, _ = stream(m, params, x, [1] * L)
  y_chunk, _ = stream(m, params, x, [5, 1, 3, 5, 2])
  y_rec, _ = apply(m, params, x, jnp.full(x.shape[:2], 7, jnp.int32))
  # FFT (conv) vs sequential complex64 recurrence: both float32, different rounding.
  assert rel(y_tok, y_conv) < 1e-5
  assert rel(y_chunk, y_conv) < 1e-5
  assert rel(y_rec, y_conv) < 1e-5


def test_streaming_final_state_is_the_recurrence():
  m, params, x = make(seed=2)
  _, cache = stream(m, params, x, [5, 3, 1, 5, 2])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
  dA = np.exp(np.exp(p["log_dt"])[:, None] * A)
  dB = (dA - 1) / A * (p["B"][..., 0] + 1j * p["B"][..., 1])
  state = np.zeros((2, H, NSTATE // 2), np.complex128)
  for t in range(L):
    state = dA * state + dB * np.asarray(x, np.float64)[:, t, :, None]
  assert rel(cache["state"], state) < 1e-5


@functools.partial(jax.jit, static_argnums=0)
def grads(m, params, x, cot, segment_ids=None):
  def loss(p, xx):
    return jnp.sum(m.apply(p, xx, segment_ids=segment_ids)[0] * cot)
  return jax.grad(loss, argnums=(0, 1))(params, x)


def test_gradients_conv_mode_match_recurrent_mode():
  m, params, x = make(seed=3)
  cot = randn(9, x.shape)
  g_conv = grads(m, params, x, cot)
  g_rec = grads(m, params, x, cot, jnp.full(x.shape[:2], 1, jnp.int32))
  for name in ("log_dt", "log_A_real", "A_imag", "B", "C", "D"):
    assert np.abs(np.asarray(g_conv[0]["params"][name])).max() > 0, name
  # Gradients sum O(L) float32 products of both signs, so they lose a little more than outputs.
  assert tree_rel(g_conv, g_rec) < 1e-4


def test_causality():
  m, params, x = make(seed=4)
  for seg in (None, jnp.zeros((2, L), jnp.int32)):
    jac = np.asarray(jacobian(m, params, x, seg))
    future = jac[np.triu_indices(L, 1)]
    if seg is None:
      # The FFT path mixes all positions in floating point; no true wrap-around means the
      # future entries are pure round-off (~1e-8 of the past ones), not exactly zero.
      assert future.max() < 1e-6 * jac.max()
    else:
      assert future.max() == 0.0
    assert (np.diag(jac) > 0).all() and (jac[np.tril_indices(L, -1)] > 0).all()


CUTS = (6, 11)  # document boundary of each batch row


def two_documents():
  """[2, L] segment ids: row b holds document 4 up to CUTS[b], then document 9."""
  pos = np.arange(L)[None]
  return jnp.asarray(np.where(pos < np.array(CUTS)[:, None], 4, 9), jnp.int32)


def separate_reference(params, x, bidirectional=False):
  """numpy_layer run on each document on its own, concatenated back."""
  rows = []
  for b, cut in enumerate(CUTS):
    xb = x[b:b + 1]
    rows.append(np.concatenate([numpy_layer(params, xb[:, :cut], bidirectional),
                                numpy_layer(params, xb[:, cut:], bidirectional)], 1))
  return np.concatenate(rows, 0)


def test_segment_resets_packing_equals_separate_documents():
  m, params, x = make(seed=5)
  seg = two_documents()
  y_packed, _ = apply(m, params, x, seg)
  ref = separate_reference(params, x)
  assert rel(y_packed, ref) < 1e-5
  # Through the streaming cache: chunks crossing a boundary, starting exactly on one (row 0 at 6
  # in the second schedule), and token by token.
  for sizes in ([5, 2, 1, 3, 5], [3, 3, 5, 5], [1] * L):
    y_s, cache = stream(m, params, x, sizes, segment_ids=seg)
    assert rel(y_s, ref) < 1e-5
    assert (np.asarray(cache["segment_id"]) == 9).all()
  # Without the reset the second documents would differ: the test can fail.
  assert rel(y_packed[0, CUTS[0]:], apply(m, params, x)[0][0, CUTS[0]:]) > 1e-2


def test_bidirectional_segments_equal_separate_documents():
  m, params, x = make(seed=6, bidirectional=True)
  seg = two_documents()
  y_packed, _ = apply(m, params, x, seg)
  assert rel(y_packed, separate_reference(params, x, True)) < 1e-5
  jac = np.asarray(jacobian(m, params, x, seg))
  cut = CUTS[0]
  assert jac[:cut, cut:].max() == 0.0 and jac[cut:, :cut].max() == 0.0
  assert jac[:cut, :cut].min() > 0 and jac[cut:, cut:].min() > 0  # anti-causal part is live


def test_bidirectional_cannot_stream():
  m, params, x = make(bidirectional=True)
  with pytest.raises(ValueError, match="streaming.*needs a causal layer"):
    m.init_cache(2, jnp.float32)
  cache = S4D(d_model=H, d_state=NSTATE).init_cache(2, jnp.float32)
  with pytest.raises(ValueError, match="streaming.*needs a causal layer"):
    m.apply(params, x, cache=cache)


def test_kernel_chunking_field_and_bf16():
  m, params, x = make(seed=7)
  y, _ = apply(m, params, x)
  y_chunked, _ = apply(S4D(d_model=H, d_state=NSTATE, kernel_chunk_size=6), params, x)
  assert rel(y_chunked, y) < 1e-6
  y16, _ = apply(m, params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert rel(y16, y) < 2e-2  # bf16 input rounding plus a bf16 output projection


def test_dropout_needs_rng_and_changes_output():
  m, params, x = make(seed=8)
  md = S4D(d_model=H, d_state=NSTATE, dropout=0.5, deterministic=False)
  run = jax.jit(lambda key: md.apply(params, x, rngs={"dropout": key})[0])
  y1, y2 = run(jax.random.key(0)), run(jax.random.key(1))
  assert rel(y1, y2) > 1e-2
  y_det, _ = apply(S4D(d_model=H, d_state=NSTATE, dropout=0.5), params, x)
  assert rel(y_det, apply(m, params, x)[0]) == 0.0
