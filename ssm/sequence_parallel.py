"""Sequence parallelism: one sequence split over the `seq` mesh axis, each device holding L / n
tokens, for any causal mixer, exactly.

Shard i needs the state that tokens before it leave behind: the mixer's streaming cache after
shards 0..i-1. `sequence_parallel_apply` gets it through the mixers' own streaming form, inside
`jax.shard_map`:

    round r = 0 .. n-2:  every shard runs its tokens from its current cache; shard i+1 receives
                         shard i's final cache (`lax.ppermute`). After round r, shards 0..r+1
                         hold their true initial cache.
    last pass:           every shard runs its tokens from its true cache: the outputs.

This is the generic form: it needs nothing from a mixer beyond `init_cache` and the cache call, so
it covers recurrences (S4D/S5, Mamba, SSD, gated delta), long convolutions and attention alike, and
it is exact (the streaming form equals the parallel one). Memory per device is that of L / n
tokens plus one cache; the cost is n passes over the local tokens, i.e. the wall time of one
device running the whole sequence. Faster per-mixer forms (a parallel prefix over the shards'
state transitions for linear recurrences, a neighbour-only exchange for sliding windows, an
all-to-all to channel sharding for long convolutions) can replace it mixer by mixer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P


def sequence_parallel_apply(module: nn.Module, variables: Any, x: jax.Array, *, mesh: Mesh,
                            segment_ids: jax.Array | None = None, axis: str = "seq",
                            batch_axes: tuple[str, ...] = ()) -> jax.Array:
  """y = module.apply(variables, x, segment_ids=segment_ids)[0], with x's length split over the
  mesh axis `axis` (and its batch over `batch_axes`). module: a causal mixer (or a ResidualBlock);
  x [batch, L, d] with L divisible by the axis size. Variables are replicated into the shard_map.
  """
  n = mesh.shape[axis]
  if x.shape[1] % n:
    raise ValueError(f"sequence_parallel_apply: length {x.shape[1]} does not divide over the "
                     f"{n} devices of mesh axis {axis!r}")
  batch_spec = batch_axes if batch_axes else None
  x_spec = P(batch_spec, axis, *([None] * (x.ndim - 2)))
  seg_spec = P(batch_spec, axis)
  has_segments = segment_ids is not None
  if not has_segments:
    segment_ids = jnp.zeros(x.shape[:2], jnp.int32)

  def local(variables, x, segment_ids):
    index = lax.axis_index(axis)
    fresh = module.init_cache(x.shape[0], x.dtype)
    seg = segment_ids if has_segments else None
    cache = fresh
    for _ in range(n - 1):
      _, final = module.apply(variables, x, segment_ids=seg, cache=cache)
      received = lax.ppermute(final, axis, perm=[(i, i + 1) for i in range(n - 1)])
      # Shard 0 always starts fresh; the others take what their left neighbour left behind.
      cache = jax.tree.map(lambda f, r: jnp.where(index == 0, f, r), fresh, received)
    y, _ = module.apply(variables, x, segment_ids=seg, cache=cache)
    return y

  variables_spec = jax.tree.map(lambda _: P(), variables)
  return jax.shard_map(local, mesh=mesh, in_specs=(variables_spec, x_spec, seg_spec),
                       out_specs=x_spec, check_vma=False)(variables, x, segment_ids)
