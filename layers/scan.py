"""Linear recurrences h_t = a_t * h_{t-1} + b_t along the length axis.

Shapes: `a` and `b` are `[batch, length, *feature]` (a may broadcast against b), real or complex.
The state `h` has `b`'s trailing shape `[batch, *feature]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _reset_mask(segment_ids: jax.Array, reverse: bool) -> jax.Array:
  """[batch, length] bool: True where the state coming from the previous step (in scan order) is dropped."""
  if reverse:
    nxt = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([nxt, jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
  prev = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), prev], axis=1)


def linear_scan_reference(a, b, *, initial_state=None, segment_ids=None, reverse=False):
  """Token-by-token recurrence with `lax.scan`: the spec the other implementations are tested against.

  Returns (h [batch, length, *feature], final_state [batch, *feature]).
  """
  a = jnp.broadcast_to(a, b.shape)
  if segment_ids is not None:
    reset = _reset_mask(segment_ids, reverse).reshape(segment_ids.shape + (1,) * (b.ndim - 2))
    a = jnp.where(reset, jnp.zeros_like(a), a)
  h0 = jnp.zeros(b.shape[:1] + b.shape[2:], b.dtype) if initial_state is None else initial_state.astype(b.dtype)

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  final, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
  return jnp.moveaxis(hs, 0, 1), final


def linear_scan(a, b, *, initial_state=None, segment_ids=None, reverse=False, impl="auto"):
  """h_t = a_t * h_{t-1} + b_t; see module docstring for shapes. impl: reference|chunked|associative|auto."""
  return linear_scan_reference(a, b, initial_state=initial_state, segment_ids=segment_ids, reverse=reverse)
