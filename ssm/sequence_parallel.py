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
device running the whole sequence.

The linear-recurrence ops also have the parallel form (`ssd_local`, `selective_scan_local`,
`gated_delta_rule_local`, called inside a shard_map over the axis): each shard scans its tokens
once from a zero state, the shards' final states and transitions are all-gathered and folded,
and each shard adds the carried-in state's contribution; three local passes, all shards at once.
The mixers do not route through these yet (nor sliding windows through a neighbour exchange, nor
long convolutions through an all-to-all to channel sharding).
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


# ---------------------------------------------------------------------------------------------
# Linear recurrences: scan the local shard, then correct with the carried-in state.
#
# Inside a shard_map over the sequence axis, for a recurrence whose state is linear in its
# initial state (h_end = M h_start + b), each shard
#   1. runs the op from a zero state:           y_local, b = op(inputs)
#   2. measures its transition M by a probe:    M = op(zero inputs, initial_state = probe) (a state
#      of ones for diagonal transitions, the identity for matrix ones; 0 where a document starts)
#   3. gathers every shard's (M, b) and folds those before it: h_in(i) = M_{i-1} h_in(i-1) + b_{i-1}
#   4. adds the carried-in state's contribution:  y = y_local + op(zero inputs, initial_state=h_in)
# Steps 1, 2 and 4 run on all shards at once; only the small states travel (an all-gather).


def carried_in_states(final: jax.Array, transition, axis: str, apply_transition) -> jax.Array:
  """h_in of this shard from all shards' zero-start final states and transitions (gathered along
  `axis`): h_in(0) = 0, h_in(i) = M_{i-1} h_in(i-1) + b_{i-1}."""
  n = lax.psum(1, axis)
  index = lax.axis_index(axis)
  finals = lax.all_gather(final, axis)
  transitions = jax.tree.map(lambda t: lax.all_gather(t, axis), transition)
  h = jnp.zeros_like(final)
  for j in range(n - 1):
    step = apply_transition(jax.tree.map(lambda t: t[j], transitions), h) + finals[j]
    h = jnp.where(j < index, step, h)
  return h


def _no_initial_state(kwargs) -> None:
  if "initial_state" in kwargs:
    raise ValueError("sequence-parallel ops start every sequence from a zero state; "
                     "initial_state is not supported")


def _continues_previous_shard(segment_ids: jax.Array | None, axis: str) -> jax.Array | None:
  """[batch] bool: this shard's first token is in the document the previous shard ended with."""
  if segment_ids is None:
    return None
  last = lax.ppermute(segment_ids[:, -1], axis,
                      perm=[(i, i + 1) for i in range(lax.psum(1, axis) - 1)])
  return segment_ids[:, 0] == last


def ssd_local(x, dt, A, B, C, D=None, *, segment_ids=None, axis: str = "seq", **kwargs):
  """`layers.mamba2.ssd` on one shard of the sequence (call inside shard_map over `axis`): the
  same outputs as the op over the whole sequence. Returns y [batch, T, heads, head_dim]."""
  from layers.mamba2 import ssd
  _no_initial_state(kwargs)
  y, final = ssd(x, dt, A, B, C, D, segment_ids=segment_ids, **kwargs)
  zeros = jnp.zeros_like(x)
  _, decay = ssd(zeros, dt, A, B, C, segment_ids=segment_ids, initial_state=jnp.ones_like(final),
                 **kwargs)
  h_in = carried_in_states(final, decay, axis, lambda m, h: m * h)
  keep = _continues_previous_shard(segment_ids, axis)
  if keep is not None:
    h_in = jnp.where(keep[:, None, None, None], h_in, 0)
  y_in, _ = ssd(zeros, dt, A, B, C, segment_ids=segment_ids, initial_state=h_in, **kwargs)
  return y + y_in


def selective_scan_local(u, delta, A, B, C, D=None, *, segment_ids=None, axis: str = "seq",
                         **kwargs):
  """`layers.mamba.selective_scan` on one shard of the sequence (inside shard_map over `axis`);
  kwargs (z, delta_bias, delta_softplus, impl ...) as for the op. Returns y [batch, T, channels]."""
  from layers.mamba import selective_scan
  _no_initial_state(kwargs)
  y, final = selective_scan(u, delta, A, B, C, D, segment_ids=segment_ids, **kwargs)
  zeros = jnp.zeros_like(u)
  _, decay = selective_scan(zeros, delta, A, B, C, segment_ids=segment_ids,
                            initial_state=jnp.ones_like(final), **kwargs)
  h_in = carried_in_states(final, decay, axis, lambda m, h: m * h)
  keep = _continues_previous_shard(segment_ids, axis)
  if keep is not None:
    h_in = jnp.where(keep[:, None, None], h_in, 0)
  y_in, _ = selective_scan(zeros, delta, A, B, C, segment_ids=segment_ids, initial_state=h_in,
                           **kwargs)
  return y + y_in


def gated_delta_rule_local(q, k, v, g, beta, *, segment_ids=None, axis: str = "seq", **kwargs):
  """`layers.gated_delta.gated_delta_rule` on one shard of the sequence (inside shard_map over
  `axis`). The transition of a shard is the [dk, dk] matrix prod_t exp(g_t)(I - beta_t k_t k_t^T),
  measured by running the rule with v = 0 from the identity. Returns out [batch, T, Hv, dv]."""
  from layers.gated_delta import gated_delta_rule
  _no_initial_state(kwargs)
  out, final = gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids, **kwargs)
  batch, _, hv, _ = v.shape
  dk = k.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(dk, dtype=final.dtype), (batch, hv, dk, dk))
  zeros_k = jnp.zeros(v.shape[:3] + (dk,), v.dtype)
  _, transition = gated_delta_rule(q, k, zeros_k, g, beta, segment_ids=segment_ids,
                                   initial_state=eye, **kwargs)           # [batch, Hv, dk, dk]
  h_in = carried_in_states(final, transition, axis,
                           lambda m, h: jnp.einsum("bhij,bhjv->bhiv", m, h))
  keep = _continues_previous_shard(segment_ids, axis)
  if keep is not None:
    h_in = jnp.where(keep[:, None, None, None], h_in, 0)
  out_in, _ = gated_delta_rule(q, k, jnp.zeros_like(v), g, beta, segment_ids=segment_ids,
                               initial_state=h_in, **kwargs)
  return out + out_in
