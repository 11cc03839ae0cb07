"""Tests for layers/long_conv.py against direct float64 numpy convolutions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.long_conv import fft_conv
from tests.numerics import rel

# jit: one compilation per shape instead of one per eager op (the CPU is shared).
conv = jax.jit(fft_conv, static_argnames="causal")


def direct_causal(u, k):
  """y[b, t, c] = sum_{s <= t} k[t - s, c] u[b, s, c]  (k: [klen, c] or [b, klen, c])."""
  u = np.asarray(u, np.float64)
  k = np.broadcast_to(np.asarray(k, np.float64), (u.shape[0],) + np.shape(k)[-2:])
  y = np.zeros_like(u)
  for t in range(u.shape[1]):
    for s in range(max(0, t - k.shape[1] + 1), t + 1):
      y[:, t] += k[:, t - s] * u[:, s]
  return y


def direct_noncausal(u, k):
  """y[b, t, c] = sum_s k[(t - s) + (M - 1), c] u[b, s, c] for |t - s| <= M - 1, k: [2M-1, c]."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  m = (k.shape[0] + 1) // 2
  y = np.zeros_like(u)
  for t in range(u.shape[1]):
    for s in range(u.shape[1]):
      if abs(t - s) <= m - 1:
        y[:, t] += k[t - s + m - 1] * u[:, s]
  return y


def randn(seed, shape):
  # numpy, not jax.random: each new shape would compile a threefry program (~1 s on this CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=3)
def conv_grads(u, k, g, causal):
  return jax.grad(lambda uu, kk: jnp.sum(fft_conv(uu, kk, causal=causal) * g), (0, 1))(u, k)


@pytest.mark.parametrize("length,klen", [(16, 16), (13, 5), (7, 1), (9, 30)])
def test_causal_matches_direct_convolution(length, klen):
  u, k = randn(0, (2, length, 3)), randn(1, (klen, 3))
  y = conv(u, k)
  assert y.shape == u.shape and y.dtype == jnp.float32
  # No wrap-around: the last outputs would pick up early inputs if the FFT were too short.
  assert rel(y, direct_causal(u, np.asarray(k)[:length])) < 1e-5


def test_per_example_kernel():
  u, k = randn(2, (3, 10, 4)), randn(3, (3, 10, 4))
  assert rel(conv(u, k), direct_causal(u, k)) < 1e-5


@pytest.mark.parametrize("length,m", [(11, 11), (11, 4), (8, 1)])
def test_noncausal_matches_direct_convolution(length, m):
  u, k = randn(4, (2, length, 3)), randn(5, (2 * m - 1, 3))
  assert rel(conv(u, k, causal=False), direct_noncausal(u, k)) < 1e-5


def test_causal_gradients_match_numpy():
  u, k = randn(6, (2, 12, 3)), randn(7, (8, 3))
  g = randn(8, (2, 12, 3))
  du, dk = conv_grads(u, k, g, True)
  u64, k64, g64 = (np.asarray(a, np.float64) for a in (u, k, g))
  # Adjoint of the causal convolution: du[s] = sum_{t >= s} k[t-s] g[t]; dk[j] = sum_t g[t] u[t-j].
  du_ref = np.zeros_like(u64)
  dk_ref = np.zeros_like(k64)
  for t in range(12):
    for s in range(max(0, t - 7), t + 1):
      du_ref[:, s] += k64[t - s] * g64[:, t]
      dk_ref[t - s] += np.sum(g64[:, t] * u64[:, s], axis=0)
  assert rel(du, du_ref) < 1e-5
  assert rel(dk, dk_ref) < 1e-5


def test_noncausal_gradients_match_numpy():
  u, k = randn(9, (2, 7, 3)), randn(10, (9, 3))
  g = randn(11, (2, 7, 3))
  du, dk = conv_grads(u, k, g, False)
  u64, k64, g64 = (np.asarray(a, np.float64) for a in (u, k, g))
  # Adjoint: du[s] = sum_t k[t-s+M-1] g[t]; dk[t-s+M-1] = sum_b g[t] u[s], for |t-s| <= M-1.
  du_ref, dk_ref = np.zeros_like(u64), np.zeros_like(k64)
  for t in range(7):
    for s in range(7):
      if abs(t - s) <= 4:
        du_ref[:, s] += k64[t - s + 4] * g64[:, t]
        dk_ref[t - s + 4] += np.sum(g64[:, t] * u64[:, s], axis=0)
  assert rel(du, du_ref) < 1e-5
  assert rel(dk, dk_ref) < 1e-5


def test_bf16_computes_in_float32():
  u, k = randn(12, (2, 64, 3)), randn(13, (64, 3))
  u16 = u.astype(jnp.bfloat16)
  y = conv(u16, k)
  assert y.dtype == jnp.bfloat16
  ref = direct_causal(np.asarray(u16.astype(jnp.float32)), k)
  # Only the final rounding to bf16 (2^-9 relative) is lost, not a bf16 FFT (~1e-2).
  assert rel(y, ref) < 4e-3


def test_bad_shapes_name_the_argument():
  u = randn(14, (2, 8, 3))
  with pytest.raises(ValueError, match="u must be"):
    fft_conv(u[0], randn(0, (4, 3)))
  with pytest.raises(ValueError, match="k has 4 channels but u has 3"):
    fft_conv(u, randn(0, (4, 4)))
  with pytest.raises(ValueError, match="odd length"):
    fft_conv(u, randn(0, (4, 3)), causal=False)
  with pytest.raises(ValueError, match="odd length"):
    fft_conv(u, randn(0, (17, 3)), causal=False)
