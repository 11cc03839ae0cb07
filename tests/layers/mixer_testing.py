"""Helpers the mixer tests share: feeding a sequence through a mixer's cache chunk by chunk, and
checking a layer's gradients against central finite differences in float64."""

from __future__ import annotations

import functools
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



# Two packed documents per row, for the S4-family tests: row b holds document 4 up to CUTS[b],
# then document 9.
CUTS = (6, 11)


def two_documents(length: int):
  """[2, length] int32 segment ids: 4 before CUTS[b], 9 from there."""
  pos = np.arange(length)[None]
  return jnp.asarray(np.where(pos < np.array(CUTS)[:, None], 4, 9), jnp.int32)


def separate_documents(layer: Callable, x) -> np.ndarray:
  """layer ([1, n, ...] -> [1, n, ...], numpy) run on each document of `two_documents` on its
  own, concatenated back: the reference a packed run must equal."""
  rows = []
  for b, cut in enumerate(CUTS):
    xb = x[b:b + 1]
    rows.append(np.concatenate([layer(xb[:, :cut]), layer(xb[:, cut:])], 1))
  return np.concatenate(rows, 0)


@functools.partial(jax.jit, static_argnums=0)
def max_jacobian(m, params, x, segment_ids=None):
  """[i, j] = max over channels of |d y[0, i] / d x[0, j]| (first example of the batch)."""
  jac = jax.jacrev(lambda xx: m.apply(params, xx, segment_ids=segment_ids)[0])(x)
  return jnp.abs(jac[0, :, :, 0]).max(axis=(1, 3))


def check_packed_and_streamed(apply: Callable, stream: Callable, m, params, x, ref, schedules):
  """The packed parallel form and the cache fed in each chunk schedule equal `ref` (the documents
  run separately), the last cached id is 9, and without segment ids row 0's second document
  differs (so the check can fail). apply(m, params, x, segment_ids) -> (y, cache);
  stream(m, params, x, sizes, segment_ids=) -> (y, cache)."""
  seg = two_documents(x.shape[1])
  y_packed, _ = apply(m, params, x, seg)
  assert rel(y_packed, ref) < 1e-5
  for sizes in schedules:
    y_s, cache = stream(m, params, x, sizes, segment_ids=seg)
    assert rel(y_s, ref) < 1e-5
    assert (np.asarray(cache["segment_id"]) == 9).all()
  assert rel(y_packed[0, CUTS[0]:], apply(m, params, x)[0][0, CUTS[0]:]) > 1e-2


def check_documents_do_not_mix(m, params, x, seg) -> None:
  """A bidirectional layer over two packed documents: no gradient crosses the boundary of row 0,
  and within each document every position reaches every other (the anti-causal part is live)."""
  jac = np.asarray(max_jacobian(m, params, x, seg))
  cut = CUTS[0]
  assert jac[:cut, cut:].max() == 0.0 and jac[cut:, :cut].max() == 0.0
  assert jac[:cut, :cut].min() > 0 and jac[cut:, cut:].min() > 0


def check_bf16_against_float64(names, fast, reference, float64) -> None:
  """An op's bf16-input fast path against its reference form on the same bf16 inputs and against
  float64 on the same (bf16-valued) inputs. Each of fast, reference, float64 is
  (output, final_state, gradients). Both forms accumulate in float32 (gradients too) and keep the
  state in float32, so against float64 only the final round-to-nearest bf16 of each output and
  gradient remains: under 2^-8 = 3.9e-3 relative per element, hence in norm; 5e-3 catches a sum
  done in bf16. The issues' bound between implementations is 1e-2."""
  (out, final, grads), (out_ref, final_ref, grads_ref), (out64, final64, grads64) = (
      fast, reference, jax.tree.map(np.asarray, float64))
  assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32  # the state stays float32
  assert rel(out, out_ref) < 1e-2 and rel(out, out64) < 5e-3 and rel(out_ref, out64) < 5e-3
  for got, ref in ((final, final_ref), (final, final64), (final_ref, final64)):
    assert rel(got, ref) < 1e-5
  for name, g, g_ref, g64 in zip(names, grads, grads_ref, grads64):
    assert g.dtype == jnp.bfloat16
    assert rel(g, g_ref) < 1e-2, name
    assert rel(g, g64) < 5e-3 and rel(g_ref, g64) < 5e-3, name
