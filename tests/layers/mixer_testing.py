"""Helpers the mixer tests share: feeding a sequence through a mixer's cache chunk by chunk, and
checking a layer's gradients against central finite differences in float64."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tests.numerics import rel


def stream(apply: Callable, m, params, x, sizes, segment_ids=None, *, check_cache=None):
  """Feeds x [batch, L, ...] through `m`'s cache in chunks of `sizes` (summing to L) with
  `apply(m, params, x_chunk, segment_ids_chunk, cache) -> (y, cache)`; `check_cache(cache, x)`
  runs on every updated cache. Returns (the concatenated outputs, the last cache)."""
  assert sum(sizes) == x.shape[1], (sizes, x.shape)
  cache = m.init_cache(x.shape[0], x.dtype)
  outs, start = [], 0
  for size in sizes:
    seg = None if segment_ids is None else segment_ids[:, start:start + size]
    y, cache = apply(m, params, x[:, start:start + size], seg, cache)
    if check_cache is not None:
      check_cache(cache, x)
    outs.append(y)
    start += size
  return jnp.concatenate(outs, axis=1), cache


def check_directional_derivatives(loss: Callable, params, x, *, seed: int = 5, directions: int = 3,
                                  eps: float = 1e-6, tol: float = 1e-6) -> None:
  """Asserts that jax.grad of loss(params, x) (float64 arrays; call under jax.enable_x64) is
  finite and matches central finite differences along random directions of (params, x)."""
  dp, dx = jax.grad(loss, (0, 1))(params, x)
  assert all(np.isfinite(a).all() for a in jax.tree.leaves((dp, dx)))
  rng = np.random.default_rng(seed)
  for _ in range(directions):
    vp = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    vx = jnp.asarray(rng.normal(size=x.shape))
    plus = loss(jax.tree.map(lambda a, v: a + eps * v, params, vp), x + eps * vx)
    minus = loss(jax.tree.map(lambda a, v: a - eps * v, params, vp), x - eps * vx)
    fd = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(a, v) for a, v in zip(jax.tree.leaves(dp), jax.tree.leaves(vp)))
    analytic += jnp.vdot(dx, vx)
    assert abs(fd - analytic) < tol * abs(analytic), (float(fd), float(analytic))


def packed_equals_separate(apply: Callable, m, params, x, *, tol: float = 1e-5) -> None:
  """x [2, L, ...]: row 0 packed as two documents (6 and L-6 tokens) must equal the two run
  separately, row 1 (one document with a nonzero id) the row run alone. `apply(m, params, x,
  segment_ids, cache)` as for `stream`."""
  length = x.shape[1]
  seg = jnp.asarray([[0] * 6 + [1] * (length - 6), [2] * length], jnp.int32)
  y, _ = apply(m, params, x, seg, None)
  first, _ = apply(m, params, x[:1, :6], None, None)
  second, _ = apply(m, params, x[:1, 6:], None, None)
  assert rel(y[:1], jnp.concatenate([first, second], axis=1)) < tol
  whole, _ = apply(m, params, x[1:], None, None)
  assert rel(y[1:], whole) < tol

