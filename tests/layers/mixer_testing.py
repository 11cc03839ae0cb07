"""Helpers the mixer tests share: feeding a sequence through a mixer's cache chunk by chunk."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


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
