"""Linear recurrences h_t = a_t * h_{t-1} + b_t along the length axis.

Shapes: `a` and `b` are `[batch, length, *feature]`; `a` may broadcast against `b` (any of its
dimensions may be 1, e.g. one decay per head shared by the head's channels). Real or complex.
The state `h` has shape `[batch, *feature]`.

    h_t = a_t * h_{t-1} + b_t,    h_{-1} = initial_state (zeros by default)

`reverse=True` runs the same recurrence from the end (h_t = a_t * h_{t+1} + b_t).
`segment_ids` ([batch, length] int) marks packed documents: where the id changes between two
consecutive tokens (in scan order) the carried state is dropped, i.e. a_t is treated as 0 there,
so no state crosses a document boundary. `initial_state` feeds only the first token in scan order.

Three implementations compute the same thing:
  reference    `lax.scan` token by token: the readable spec, sequential depth `length`.
  chunked      chunk-local loops run in parallel across chunks, and the carried state is passed
               from chunk to chunk; depth 2*chunk_size + length/chunk_size, memory O(length).
  associative  `lax.associative_scan` with the affine-map composition; depth O(log length).
`reference` is differentiated by autodiff (forward and reverse mode); `chunked` and `associative`
by the adjoint recurrence run through the same implementation (reverse mode only, see
`_scan_with_vjp`). The state dtype is the promoted input dtype, at least float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ArrayLike = jax.typing.ArrayLike
ScanResult = tuple[jax.Array, jax.Array]


def _state_dtype(*arrays: jax.Array) -> jnp.dtype:
  # The recurrent state never runs in bf16/f16: promoting with float32 keeps f64 and complex.
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _reset_mask(segment_ids: jax.Array, reverse: bool) -> jax.Array:
  """[batch, length] bool: True where the state carried in (in scan order) is dropped."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  edge = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
  # Forward: token t drops the state from t-1. Reverse: token t drops the state from t+1.
  parts = [change, edge] if reverse else [edge, change]
  return jnp.concatenate(parts, axis=1)


def _prepare(a: ArrayLike, b: ArrayLike, initial_state: ArrayLike | None,
             segment_ids: ArrayLike | None,
             reverse: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Validates shapes, promotes dtypes and folds segment resets into `a`.

  Returns (a, b [batch, length, *feature], h0 [batch, *feature]) in the state dtype; `a` keeps its
  broadcast shape (dimensions of 1) and is 0 where the carried state is dropped.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if b.ndim < 2:
    raise ValueError(f"b must be [batch, length, *feature]; got shape {b.shape}")
  if a.ndim != b.ndim or any(da not in (1, db) for da, db in zip(a.shape, b.shape)):
    raise ValueError(f"a (shape {a.shape}) must broadcast to b (shape {b.shape}) with the same "
                     "number of dimensions: each dimension of a equal to b's or 1")
  state_shape = b.shape[:1] + b.shape[2:]
  arrays = [a, b]
  if initial_state is not None:
    initial_state = jnp.asarray(initial_state)
    if initial_state.ndim != len(state_shape) or any(
        d not in (1, s) for d, s in zip(initial_state.shape, state_shape)):
      raise ValueError(f"initial_state has shape {initial_state.shape}; expected [batch, *feature]"
                       f" = {state_shape} (b has shape {b.shape})")
    arrays.append(initial_state)
  dtype = _state_dtype(*arrays)
  a, b = a.astype(dtype), b.astype(dtype)
  if initial_state is None:
    h0 = jnp.zeros(state_shape, dtype)
  else:
    h0 = jnp.broadcast_to(initial_state.astype(dtype), state_shape)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != b.shape[:2]:
      raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [batch, length] = "
                       f"{b.shape[:2]} (b has shape {b.shape})")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integer; got dtype {segment_ids.dtype}")
    reset = _reset_mask(segment_ids, reverse).reshape(b.shape[:2] + (1,) * (b.ndim - 2))
    a = jnp.where(reset, jnp.zeros((), dtype), a)
  return a, b, h0


def linear_scan_reference(a: ArrayLike, b: ArrayLike, *, initial_state: ArrayLike | None = None,
                          segment_ids: ArrayLike | None = None,
                          reverse: bool = False) -> ScanResult:
  """Token-by-token recurrence with `lax.scan`: the spec the other implementations are tested on.

  Args: a [batch, length, *feature] (broadcastable to b), b [batch, length, *feature],
    initial_state [batch, *feature], segment_ids [batch, length] int.
  Returns (h [batch, length, *feature], final_state [batch, *feature]).
  """
  a, b, h0 = _prepare(a, b, initial_state, segment_ids, reverse)
  a = jnp.broadcast_to(a, b.shape)

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  final, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
  return jnp.moveaxis(hs, 0, 1), final


def default_chunk_size(length: int) -> int:
  """Chunk size used by `chunked` when none is given: a power of two near sqrt(length).

  The sequential depth 2c + length/c is smallest near c = sqrt(length / 2); the bench (`python -m
  ssm bench --ops scan --scan-chunk-sizes ...`) puts the best c at about sqrt(length) on H200 and
  finds the time flat in c on CPU.
  """
  if length <= 1:
    return 1
  return 1 << max(0, round(math.log2(math.sqrt(length))))


def _sweep(a: jax.Array, b: jax.Array, h0: jax.Array, axis: int, reverse: bool,
           exclusive: bool = False) -> tuple[jax.Array, jax.Array]:
  """Sequential h = a_t * h + b_t along `axis`, indexing in place.

  The loop slices `axis` where it is instead of moving it to the front as `lax.scan` needs: each
  such transpose is a full copy, which the bench shows costs more than the recurrence on CPU.
  Returns (final state, states [same shape as b]): the state after each step, or with
  `exclusive` the state entering each step.
  """
  length = b.shape[axis]

  def body(i, carry):
    h, out = carry
    t = length - 1 - i if reverse else i
    a_t = lax.dynamic_index_in_dim(a, t, axis, keepdims=False)
    b_t = lax.dynamic_index_in_dim(b, t, axis, keepdims=False)
    h_new = a_t * h + b_t
    out = lax.dynamic_update_index_in_dim(out, h if exclusive else h_new, t, axis)
    return h_new, out

  return lax.fori_loop(0, length, body, (h0, jnp.zeros(b.shape, b.dtype)))


def _compose_along(a: jax.Array, b: jax.Array, axis: int,
                   reverse: bool) -> tuple[jax.Array, jax.Array]:
  """The maps h -> a_t*h + b_t composed along `axis` in scan order, as one map h -> A*h + B.

  Returns (A = product of a_t, B = the state reached from h = 0), `axis` removed.
  """
  length = b.shape[axis]
  a_shape = a.shape[:axis] + a.shape[axis + 1:]
  b_shape = b.shape[:axis] + b.shape[axis + 1:]

  def body(i, carry):
    decay, h = carry
    t = length - 1 - i if reverse else i
    a_t = lax.dynamic_index_in_dim(a, t, axis, keepdims=False)
    b_t = lax.dynamic_index_in_dim(b, t, axis, keepdims=False)
    return decay * a_t, a_t * h + b_t

  init = (jnp.ones(a_shape, a.dtype), jnp.zeros(b_shape, b.dtype))
  return lax.fori_loop(0, length, body, init)


def _chunked_core(a: jax.Array, b: jax.Array, h0: jax.Array, chunk_size: int,
                  reverse: bool) -> ScanResult:
  """Chunked scan of prepared inputs (see `linear_scan_chunked`); `a` may keep broadcast dims."""
  length = b.shape[1]
  c = min(chunk_size, length)
  n = -(-length // c)
  pad = n * c - length
  a = jnp.broadcast_to(a, a.shape[:1] + (length,) + a.shape[2:])
  if pad:
    # The identity map (a=1, b=0) carries the state through unchanged, whichever the direction.
    pad_width = [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2)
    a = jnp.pad(a, pad_width, constant_values=1)
    b = jnp.pad(b, pad_width)
  # [batch, n*c, *f] -> [batch, n, c, *f] is free; every loop below runs over all chunks at once.
  a = a.reshape(a.shape[:1] + (n, c) + a.shape[2:])
  b = b.reshape(b.shape[:1] + (n, c) + b.shape[2:])
  chunk_decay, chunk_h = _compose_along(a, b, 2, reverse)
  # Each chunk as one map h -> chunk_decay*h + chunk_h; a short scan gives the state entering it.
  final, h_in = _sweep(chunk_decay, chunk_h, h0, 1, reverse, exclusive=True)
  _, h = _sweep(a, b, h_in, 2, reverse)
  return h.reshape(b.shape[:1] + (n * c,) + b.shape[3:])[:, :length], final


def linear_scan_chunked(a: ArrayLike, b: ArrayLike, *, initial_state: ArrayLike | None = None,
                        segment_ids: ArrayLike | None = None, reverse: bool = False,
                        chunk_size: int | None = None) -> ScanResult:
  """Two-level scan: chunk-local loops in parallel across chunks, the carry across chunks.

  The length is cut into n = ceil(length / c) chunks of c = `chunk_size` tokens (the tail is
  padded with the identity a=1, b=0). Three passes, each a loop vectorised over all chunks:
    1. each chunk composed into one map h -> A_k*h + B_k (A_k = product of its a_t, B_k = the
       state it reaches from 0): c steps;
    2. the state entering each chunk, h_in[k+1] = A_k*h_in[k] + B_k, h_in[0] = initial state:
       n steps;
    3. each chunk's recurrence again, started from h_in[k], writing h: c steps.
  Sequential depth 2c + n, memory O(length); products of `a` are only ever multiplied, never
  divided by, so decays that underflow are harmless. The loops index the length axis in place:
  on CPU (the platform it is built for) a transpose to scan order costs more than the arithmetic.
  Recomputing pass 3 instead of storing chunk-local states and prefix products moves fewer bytes.

  Args: as `linear_scan_reference`, plus chunk_size (default `default_chunk_size(length)`).
  Returns (h [batch, length, *feature], final_state [batch, *feature]).
  """
  a, b, h0 = _prepare(a, b, initial_state, segment_ids, reverse)
  length = b.shape[1]
  if chunk_size is None:
    chunk_size = default_chunk_size(length)
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  chunk_size = int(chunk_size)
  if length == 0:
    return b, h0
  return _scan_with_vjp("chunked", chunk_size, reverse, a, b, h0)


def _compose(earlier: tuple[jax.Array, jax.Array],
             later: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Composition of affine maps h -> a*h + b: first `earlier`, then `later`."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def _associative_core(a: jax.Array, b: jax.Array, h0: jax.Array, chunk_size: int,
                      reverse: bool) -> ScanResult:
  """Associative scan of prepared inputs (see `linear_scan_associative`); chunk_size unused."""
  del chunk_size
  length = b.shape[1]
  a = jnp.broadcast_to(a, a.shape[:1] + (length,) + a.shape[2:])
  first = length - 1 if reverse else 0
  b = b.at[:, first].add(a[:, first] * h0)
  _, h = lax.associative_scan(_compose, (a, b), reverse=reverse, axis=1)
  return h, h[:, length - 1 - first]


def linear_scan_associative(a: ArrayLike, b: ArrayLike, *, initial_state: ArrayLike | None = None,
                            segment_ids: ArrayLike | None = None,
                            reverse: bool = False) -> ScanResult:
  """Parallel prefix scan (`lax.associative_scan`) over the maps h -> a_t*h + b_t.

  The initial state is folded into the first token in scan order: b_0 <- a_0 * h0 + b_0.
  Depth O(log length), work O(length), memory O(length). Gradients as in `_scan_with_vjp`.
  Args and returns as `linear_scan_reference`.
  """
  a, b, h0 = _prepare(a, b, initial_state, segment_ids, reverse)
  if b.shape[1] == 0:
    return b, h0
  return _scan_with_vjp("associative", 0, reverse, a, b, h0)


_CORES: dict[str, Callable[..., ScanResult]] = {
    "chunked": _chunked_core, "associative": _associative_core}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan_with_vjp(core: str, chunk_size: int, reverse: bool, a: jax.Array, b: jax.Array,
                   h0: jax.Array) -> ScanResult:
  """Runs `_CORES[core]`, differentiated by the adjoint recurrence below instead of autodiff.

  Autodiff through the in-place loops of `chunked` was over 10x slower than this at length 16k
  (each dynamic slice transposes into a full-length update); the adjoint of a linear recurrence
  is itself a linear recurrence. With
  lam_t = dL/dh_t in total (JAX's convention: transposes, no complex conjugates), in scan order
      lam_t = a_{t+1} * lam_{t+1} + g_t,   lam_last = g_last + g_final
      dL/db_t = lam_t,   dL/da_t = lam_t * h_{t-1},   dL/dh0 = a_first * lam_first,
  so the backward pass is the same core run the other way. Forward-mode (jax.jvp) is not
  defined for it; the reference implementation supports both modes.
  """
  return _CORES[core](a, b, h0, chunk_size, reverse)


def _scan_fwd(core: str, chunk_size: int, reverse: bool, a: jax.Array, b: jax.Array,
              h0: jax.Array) -> tuple[ScanResult, tuple[jax.Array, ...]]:
  h, final = _CORES[core](a, b, h0, chunk_size, reverse)
  return (h, final), (a, h0, h)


def _scan_bwd(core: str, chunk_size: int, reverse: bool, residuals: tuple[jax.Array, ...],
              cotangents: ScanResult) -> tuple[jax.Array, jax.Array, jax.Array]:
  a, h0, h = residuals
  g_h, g_final = cotangents
  a_full = jnp.broadcast_to(a, h.shape)
  one = jnp.ones_like(a_full[:, :1])
  # In array order: the decay applied to lam_t comes from the next token in scan order, and the
  # state entering token t is the previous one in scan order (h0 for the first).
  if reverse:
    a_next = jnp.concatenate([one, a_full[:, :-1]], axis=1)
    h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
  else:
    a_next = jnp.concatenate([a_full[:, 1:], one], axis=1)
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  lam, lam_first = _CORES[core](a_next, g_h, g_final, chunk_size, not reverse)
  first = h.shape[1] - 1 if reverse else 0
  d_a = lam * h_prev
  # a may be broadcast: sum its cotangent over the dimensions it was broadcast along.
  summed = tuple(i for i, (da, dh) in enumerate(zip(a.shape, h.shape)) if da == 1 and dh != 1)
  d_a = jnp.sum(d_a, axis=summed, keepdims=True) if summed else d_a
  return d_a, lam, a_full[:, first] * lam_first


_scan_with_vjp.defvjp(_scan_fwd, _scan_bwd)


IMPLEMENTATIONS: dict[str, Callable[..., ScanResult]] = {
    "reference": linear_scan_reference,
    "chunked": linear_scan_chunked,
    "associative": linear_scan_associative,
}

# Measured with `python -m ssm bench --ops scan` (batch 4, 256 features, lengths 1k-16k, forward
# and forward+backward). CPU (2 shared cores, noisy): `chunked` runs the forward 1.1-2.3x and
# forward+backward 0.8-1.4x as fast as the reference, `associative` 0.15-0.75x. H200 (jax 0.11):
# `associative` is 10-40x faster than `chunked` (whose loops are bound by per-iteration launch
# latency), also at batch 8 x 4096 features and at batch 1 x 64 features.
# TPU is not measured yet; it gets the parallel form, as on GPU.
_AUTO = {"cpu": "chunked", "gpu": "associative", "tpu": "associative"}
_AUTO_DEFAULT = "associative"


def linear_scan(a: ArrayLike, b: ArrayLike, *, initial_state: ArrayLike | None = None,
                segment_ids: ArrayLike | None = None, reverse: bool = False, impl: str = "auto",
                chunk_size: int | None = None) -> ScanResult:
  """h_t = a_t * h_{t-1} + b_t along axis 1 (h_t = a_t * h_{t+1} + b_t when reverse).

  Args:
    a: [batch, length, *feature] decays, broadcastable to b (dimensions equal to b's or 1).
    b: [batch, length, *feature] inputs. float32/float64/complex64/complex128; the state is
      computed in the promoted dtype of a, b and initial_state, at least float32.
    initial_state: [batch, *feature], the state before the first token in scan order (zeros).
    segment_ids: [batch, length] int; where the id changes between consecutive tokens in scan
      order the carried state is dropped (a_t treated as 0).
    reverse: scan from the last token to the first.
    impl: "reference" | "chunked" | "associative" | "auto". "auto" picks the fastest in the
      bench on the current backend: `chunked` on CPU, `associative` on GPU (H200 measured) and
      on TPU (not measured yet).
    chunk_size: tokens per chunk for `chunked` (default `default_chunk_size(length)`); the other
      implementations ignore it.

  Returns:
    (h [batch, length, *feature], final_state [batch, *feature]).
  """
  if impl == "auto":
    impl = _AUTO.get(jax.default_backend(), _AUTO_DEFAULT)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {sorted(IMPLEMENTATIONS) + ['auto']}; got {impl!r}")
  kwargs = dict(initial_state=initial_state, segment_ids=segment_ids, reverse=reverse)
  if impl == "chunked":
    kwargs["chunk_size"] = chunk_size
  return IMPLEMENTATIONS[impl](a, b, **kwargs)
