"""Tests for layers/long_conv.py against direct float64 numpy convolutions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.long_conv import direct_conv, fft_conv, two_sided_kernel
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


@pytest.mark.parametrize("causal,length,klen", [(True, 16, 16), (True, 13, 6), (False, 12, 23),
                                                (False, 9, 5)])
def test_float64_matches_direct_convolution(causal, length, klen):
  rng = np.random.default_rng(15)
  u, k, D = rng.normal(size=(2, length, 3)), rng.normal(size=(klen, 3)), rng.normal(size=3)
  ref = (direct_causal(u, k) if causal else direct_noncausal(u, k)) + D * u
  with jax.enable_x64(True):
    y = fft_conv(jnp.asarray(u), jnp.asarray(k), causal=causal, D=jnp.asarray(D))
    assert y.dtype == jnp.float64
    assert rel(y, ref) < 1e-10


def test_two_sided_kernel_is_a_causal_plus_a_strictly_anticausal_convolution():
  rng = np.random.default_rng(16)
  u, kc, ka = rng.normal(size=(2, 10, 3)), rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
  # y_t = sum_{s <= t} kc[t-s] u_s + sum_{s > t} ka[s-t-1] u_s, written out.
  ref = direct_causal(u, kc)
  ref += direct_causal(u[:, ::-1], np.concatenate([np.zeros((1, 3)), ka[:-1]]))[:, ::-1]
  k = two_sided_kernel(jnp.asarray(kc, jnp.float32), jnp.asarray(ka, jnp.float32))
  assert k.shape == (19, 3)
  assert rel(conv(jnp.asarray(u, jnp.float32), k, causal=False), ref) < 1e-5


def direct_segmented(u, k, seg, causal):
  """float64 loops: y[b, t] = sum_s k[tap] u[b, s] over s in t's document (seg[b, s] == seg[b, t]),
  tap = t - s (causal, 0 <= tap < klen) or t - s + M - 1 (non-causal, |t - s| <= M - 1)."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  m = (k.shape[0] + 1) // 2
  y = np.zeros_like(u)
  for b in range(u.shape[0]):
    for t in range(u.shape[1]):
      for s in range(u.shape[1]):
        tap = t - s if causal else t - s + m - 1
        if 0 <= tap < k.shape[0] and (causal or abs(t - s) <= m - 1) and seg[b, s] == seg[b, t]:
          y[b, t] += k[tap] * u[b, s]
  return y


direct = jax.jit(direct_conv, static_argnames=("causal", "block_size"))


@pytest.mark.parametrize("causal,length,klen,block", [
    (True, 23, 23, 8), (True, 23, 5, 4), (True, 7, 30, 16), (False, 23, 45, 8), (False, 20, 7, 3)])
def test_direct_conv_with_segments_matches_loops(causal, length, klen, block):
  rng = np.random.default_rng(17)
  u, k = randn(18, (2, length, 3)), randn(19, (klen, 3))
  seg = np.sort(rng.integers(0, 4, (2, length)), axis=1).astype(np.int32)
  y = direct(u, k, causal=causal, segment_ids=jnp.asarray(seg), block_size=block)
  assert rel(y, direct_segmented(u, k, seg, causal)) < 1e-5
  # Without segment ids it is fft_conv.
  assert rel(direct(u, k, causal=causal, block_size=block), conv(u, k, causal=causal)) < 1e-5


def test_direct_conv_with_segments_float64_and_gradients():
  rng = np.random.default_rng(20)
  u, k, g = rng.normal(size=(2, 11, 2)), rng.normal(size=(6, 2)), rng.normal(size=(2, 11, 2))
  seg = np.sort(rng.integers(0, 3, (2, 11)), axis=1).astype(np.int32)
  # The convolution is bilinear: the gradient of <g, y(u, k)> is y's adjoint, formed from loops
  # on unit vectors of u and k.
  eye_u = np.eye(u.size).reshape((u.size,) + u.shape)
  du_ref = np.array([np.sum(g * direct_segmented(e, k, seg, True)) for e in eye_u]).reshape(u.shape)
  eye_k = np.eye(k.size).reshape((k.size,) + k.shape)
  dk_ref = np.array([np.sum(g * direct_segmented(u, e, seg, True)) for e in eye_k]).reshape(k.shape)
  with jax.enable_x64(True):
    args = [jnp.asarray(a) for a in (u, k)]
    f = lambda u, k: jnp.sum(jnp.asarray(g) * direct_conv(u, k, segment_ids=jnp.asarray(seg),
                                                          block_size=4))
    assert rel(direct_conv(*args, segment_ids=jnp.asarray(seg), block_size=4),
               direct_segmented(u, k, seg, True)) < 1e-12
    du, dk = jax.grad(f, (0, 1))(*args)
    assert rel(du, du_ref) < 1e-12 and rel(dk, dk_ref) < 1e-12


@pytest.mark.parametrize("n_ctx,length", [(9, 1), (9, 6), (3, 20)])
def test_direct_conv_continues_a_history(n_ctx, length):
  rng = np.random.default_rng(21)
  x, k = randn(22, (2, n_ctx + length, 3)), randn(23, (10, 3))
  seg = np.sort(rng.integers(0, 3, (2, n_ctx + length)), axis=1).astype(np.int32)
  y = direct(x[:, n_ctx:], k, segment_ids=jnp.asarray(seg[:, n_ctx:]), context=x[:, :n_ctx],
             context_segment_ids=jnp.asarray(seg[:, :n_ctx]), block_size=4)
  assert rel(y, direct_segmented(x, k, seg, True)[:, n_ctx:]) < 1e-5


def test_direct_conv_rejects_bad_arguments():
  u, k = randn(24, (2, 8, 3)), randn(25, (4, 3))
  with pytest.raises(ValueError, match="odd length"):
    direct_conv(u, k, causal=False)
  with pytest.raises(ValueError, match="needs causal=True"):
    direct_conv(u, k, causal=False, context=u, context_segment_ids=jnp.zeros((2, 8), jnp.int32))
  with pytest.raises(ValueError, match="context_segment_ids"):
    direct_conv(u, k, context=u)
  with pytest.raises(ValueError, match="same channels"):
    direct_conv(u, randn(0, (4, 2)))
