"""Collectives for sequence parallelism: a sequence split over a mesh axis, each device holding one
contiguous shard of T = L / n tokens, shard i holding positions [i T, (i + 1) T).

Every mixer has a `seq_axis` field. Left None, the mixer sees the whole sequence. Set to a mesh axis
name, the mixer is called inside `jax.shard_map` over that axis with its local shard of
`x [batch, T, d]` (and of `segment_ids [batch, T]`), and it computes exactly the outputs the whole
sequence would give at those positions, exchanging with the other shards only what its equations
need:

  short convolutions     the K - 1 inputs before the shard, from the left neighbour
                         (`from_previous_shards`)
  linear recurrences     scan the shard from a zero state, fold the all-gathered shard transitions
                         into the state carried in, add its contribution (`carried_in_states`)
  sliding-window attn    the w - 1 keys/values before the shard (`from_previous_shards`; and
                         after it if bidirectional, `from_next_shards`)
  global attention       all keys/values (`gather_sequence`)
  long convolutions      all-to-all from length sharding to channel sharding and back
                         (`sequence_to_channels`, `channels_to_sequence`, `channel_shard`)

Only the parallel form (cache=None) is sequence-parallel; streaming and decoding run unsharded.
These helpers must be called inside a shard_map (or another context) that binds `axis`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def axis_size(axis: str) -> int:
  """The number of shards along `axis` (a Python int)."""
  return lax.psum(1, axis)


def shard_index(axis: str) -> Array:
  """This shard's position along `axis` (a traced int32 scalar)."""
  return lax.axis_index(axis)


def check_parallel_form(layer: str, seq_axis: str | None, cache: Any) -> None:
  """Raises if a layer is asked to stream (cache) while sequence-parallel: only the parallel form
  is sharded over the sequence."""
  if seq_axis is not None and cache is not None:
    raise ValueError(f"{layer}: streaming (cache) and seq_axis do not combine; sequence "
                     "parallelism is for the parallel form (cache=None)")


def from_previous_shards(x: Array, width: int, axis: str, *, fill: Any = 0) -> Array:
  """The `width` positions just before this shard, along axis 1: [batch, width, ...].

  x: [batch, T, ...] this shard's positions. Positions before the sequence start are `fill`.
  Shifts each needed piece right by 1, 2, ... shards (`lax.ppermute`); a width up to T needs one
  exchange with the left neighbour, of the last `width` positions only.
  """
  if width <= 0:
    return x[:, :0]
  n, T = axis_size(axis), x.shape[1]
  index = shard_index(axis)
  pieces = []
  shifts = min(-(-width // T), n - 1)
  for s in range(shifts, 0, -1):  # the farthest shard first
    need = min(T, width - (s - 1) * T)
    received = lax.ppermute(x[:, T - need:], axis, perm=[(i, i + s) for i in range(n - s)])
    pieces.append(jnp.where(index >= s, received, jnp.asarray(fill, x.dtype)))
  missing = width - sum(p.shape[1] for p in pieces)
  if missing:  # more than the whole sequence before this shard: the rest is before the start
    pieces.insert(0, jnp.full((x.shape[0], missing) + x.shape[2:], fill, x.dtype))
  return jnp.concatenate(pieces, axis=1)


def from_next_shards(x: Array, width: int, axis: str, *, fill: Any = 0) -> Array:
  """The `width` positions just after this shard, along axis 1: [batch, width, ...] (the mirror of
  `from_previous_shards`; positions past the sequence end are `fill`)."""
  if width <= 0:
    return x[:, :0]
  n, T = axis_size(axis), x.shape[1]
  index = shard_index(axis)
  pieces = []
  for s in range(1, min(-(-width // T), n - 1) + 1):  # the nearest shard first
    need = min(T, width - (s - 1) * T)
    received = lax.ppermute(x[:, :need], axis, perm=[(i + s, i) for i in range(n - s)])
    pieces.append(jnp.where(index < n - s, received, jnp.asarray(fill, x.dtype)))
  missing = width - sum(p.shape[1] for p in pieces)
  if missing:  # past the end of the sequence
    pieces.append(jnp.full((x.shape[0], missing) + x.shape[2:], fill, x.dtype))
  return jnp.concatenate(pieces, axis=1)


def mirror(x: Array, axis: str) -> Array:
  """Shard i gets shard n-1-i's x: read in mirrored shard order, a scan from the end of the
  sequence is a scan from the start."""
  n = axis_size(axis)
  return lax.ppermute(x, axis, perm=[(i, n - 1 - i) for i in range(n)])


def gather_sequence(x: Array, axis: str) -> Array:
  """All shards' positions in order: [batch, T, ...] -> [batch, n T, ...]."""
  return lax.all_gather(x, axis, axis=1, tiled=True)


def _check_channels(x: Array, axis: str, who: str) -> int:
  n = axis_size(axis)
  if x.shape[-1] % n:
    raise ValueError(f"{who}: {x.shape[-1]} channels do not divide over the {n} shards of mesh "
                     f"axis {axis!r} (long convolutions switch to channel sharding)")
  return n


def sequence_to_channels(x: Array, axis: str) -> Array:
  """All-to-all from length sharding to channel sharding: [batch, T, C] -> [batch, n T, C / n]
  (this shard keeps channels [i C/n, (i + 1) C/n) of the whole sequence)."""
  _check_channels(x, axis, "sequence_to_channels")
  return lax.all_to_all(x, axis, split_axis=x.ndim - 1, concat_axis=1, tiled=True)


def channels_to_sequence(y: Array, axis: str) -> Array:
  """The inverse all-to-all: [batch, n T, C / n] -> [batch, T, C]."""
  return lax.all_to_all(y, axis, split_axis=1, concat_axis=y.ndim - 1, tiled=True)


def channel_shard(a: Array, axis: str, channel_axis: int = -1) -> Array:
  """This shard's slice of a per-channel array (e.g. a long-convolution kernel [..., C]) under
  `sequence_to_channels`: channels [i C/n, (i + 1) C/n) along `channel_axis`."""
  n = _check_channels(jnp.moveaxis(a, channel_axis, -1), axis, "channel_shard")
  size = a.shape[channel_axis] // n
  return lax.dynamic_slice_in_dim(a, shard_index(axis) * size, size, axis=channel_axis)


# ---------------------------------------------------------------------------------------------
# Linear recurrences: scan the local shard from zero, then correct with the carried-in state.
#
# For a recurrence whose final state is affine in its initial state, h_end = M h_start + b, each
# shard
#   1. runs the op from a zero state:            y_local, b = op(inputs)
#   2. measures its transition M by a probe:     op(zero inputs, initial_state = probe)
#      (a state of ones for diagonal transitions, the identity for matrix ones)
#   3. gathers every shard's (M, b) and folds those before it: h_in(i) = M_{i-1} h_in(i-1) + b_{i-1}
#   4. adds the carried-in state's contribution:  y = y_local + op(zero inputs, initial_state=h_in)
# Steps 1, 2 and 4 run on all shards at once; only the states travel (an all-gather).


def carried_in_states(final: Array, transition: Any, axis: str,
                      apply_transition: Callable[[Any, Array], Array], *,
                      segment_ids: Array | None = None, reverse: bool = False) -> Array:
  """h_in [batch, ...] of this shard from all shards' zero-start final states b and transitions M
  (gathered along `axis`):

      h_in(0) = 0,    h_in(i) = apply_transition(M_{i-1}, c_{i-1} h_in(i-1)) + b_{i-1},

  c_j = 0 where shard j starts a new document (its first token's segment id differs from the
  previous token's; see `continues_previous_shard`), else 1; the returned h_in is c_i h_in(i).
  reverse=True: the state flows from the end (shard i takes it from i+1 ... n-1); `final` is then
  the state at the shard's first position, and a shard continues when its last token is in the
  document of the next shard's first.
  """
  if reverse:  # a forward fold over the shards in mirrored order, each read backwards
    flip = lambda t: jax.tree.map(lambda a: mirror(a, axis), t)
    ids = None if segment_ids is None else flip(segment_ids[:, ::-1])
    return mirror(carried_in_states(flip(final), flip(transition), axis, apply_transition,
                                    segment_ids=ids), axis)
  n, index = axis_size(axis), shard_index(axis)
  finals = lax.all_gather(final, axis)
  transitions = jax.tree.map(lambda t: lax.all_gather(t, axis), transition)
  keep = continues_previous_shard(segment_ids, axis)
  keeps = None if keep is None else lax.all_gather(keep, axis)
  masked = lambda h, j: h if keeps is None else jnp.where(
      keeps[j].reshape(keeps.shape[1:] + (1,) * (h.ndim - 1)), h, 0)
  h = jnp.zeros_like(final)
  for j in range(n - 1):
    step = apply_transition(jax.tree.map(lambda t: t[j], transitions), masked(h, j)) + finals[j]
    h = jnp.where(j < index, step, h)
  return masked(h, index)


def continues_previous_shard(segment_ids: Array | None, axis: str) -> Array | None:
  """[batch] bool: this shard's first token is in the document the previous shard ended with
  (None without segment ids: one document)."""
  if segment_ids is None:
    return None
  last = from_previous_shards(segment_ids[:, -1:], 1, axis, fill=-1)[:, 0]
  return segment_ids[:, 0] == last


def no_initial_state(kwargs: dict, who: str) -> None:
  if kwargs.get("initial_state") is not None:
    raise ValueError(f"{who}: a sequence-parallel op starts every sequence from a zero state; "
                     "initial_state is not supported")


def linear_scan_local(a: Array, b: Array, *, segment_ids: Array | None = None, axis: str,
                      reverse: bool = False, **kwargs) -> Array:
  """`layers.scan.linear_scan` on this shard of the sequence: the states h [batch, T, *feature] the
  whole sequence would give here (h_t = a_t h_{t-1} + b_t). With reverse=True the scan runs from
  the end and the state comes in from the shards to the right. kwargs: impl, chunk_size.

  The transitions are diagonal, so the probe is the running product of a: the carried-in state
  reaches position t as decay_t * h_in, decay_t = prod of a from the shard edge to t.
  """
  from layers.scan import linear_scan
  no_initial_state(kwargs, "linear_scan_local")
  kwargs.pop("initial_state", None)
  h, final = linear_scan(a, b, segment_ids=segment_ids, reverse=reverse, **kwargs)
  decay, _ = linear_scan(jnp.broadcast_to(a, h.shape), jnp.zeros_like(h), reverse=reverse,
                         segment_ids=segment_ids, initial_state=jnp.ones_like(final), **kwargs)
  through = decay[:, 0] if reverse else decay[:, -1]  # the product over the whole shard
  h_in = carried_in_states(final, through, axis, lambda m, s: m * s, segment_ids=segment_ids,
                           reverse=reverse)
  return h + decay * h_in[:, None]
