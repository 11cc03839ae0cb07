"""Pallas kernel for the Mamba-1 selective scan (`layers.mamba.selective_scan`, impl="pallas").

Computes, per batch row b, channel d and state index n, from the float32 inputs that
`layers.mamba._prepare` returns (delta already biased and softplus'ed):

    a_t = keep_t exp(delta_t A)        keep_t = 0 where segment_ids change (reset), else 1
    h_t = a_t * h_{t-1} + (delta_t u_t) B_t               h_{-1} = h0
    y_t = sum_n C_t[n] h_t[n]                             (D u and the z gate are added outside)

and returns (y [batch, length, channels], final state h_{L-1} [batch, channels, state]).
B and C must be per token and shared by the channels ([batch, length, state], the Mamba
mixer's layout); `supports` rejects grouped and time-invariant B / C.

Grid (batch, channel blocks), every program independent. A program holds the float32 state
transposed, h [state, block_channels] (channels on the fast axis: TPU lanes, coalesced GPU
rows), and walks its whole sequence in chunks of T tokens (`lax.fori_loop` over chunks; the T
tokens of a chunk are unrolled, so a chunk's loads are independent of the state and can be
issued ahead of the recurrence). Per token it reads one row of u / delta ([1, block_channels]),
B / C ([1, state], turned into [state, 1] columns by a masked reduction with the identity, so
that no small-shape transpose has to lower on Triton or Mosaic) and the keep flag, updates h
and writes the row y_t = sum_n C_t h_t. The forward saves h at every chunk start ([batch,
chunks, state, channels], the only per-chunk memory).

Backward (another pallas_call on the same grid) walks the chunks in reverse. For chunk c it
recomputes the chunk's T pre-token states h_{t-1} from the saved chunk-start state (kept as
values: T * state * block_channels floats, no scratch memory), then runs the adjoint
recurrence token by token from the last (recomputing a_t and h_t = a_t h_{t-1} + ...), with g
the cotangent of h_t:

    g    += C_t dy_t                     dC_t[n] = sum_d dy_t h_t[n]
    du_t  = delta_t sum_n g B_t          ddelta_t = u_t sum_n g B_t + sum_n g h_{t-1} a_t A
    dB_t[n] = sum_d g (delta_t u_t)      dA += g h_{t-1} a_t delta_t
    g     = a_t g                        (g after token 0 is dh0)

starting from g = d(final state). dB / dC come out per channel block ([batch, channel blocks,
length, state]) and dA per batch row; the wrapper sums them (plain jnp). The backward costs
about two forwards (two exps per element and token), and memory is the inputs plus one state
per chunk, never [batch, length, channels, state].

Lowerings: on GPU the Triton lowering (`pallas.triton.CompilerParams(num_warps, num_stages)`):
its programs run the sequential loop over chunks with register-resident state and small
reductions well, and it runs on A100 and H100 alike (no Hopper-only features); channel blocks
of 32 there, for more programs to hide each token's latency. On TPU Mosaic, channel blocks of
128 (one lane tile), both grid axes "parallel"; a program keeps its whole sequence of u / delta
/ y blocks in VMEM, which bounds the length (`supports` checks it there). Padding (in the
wrapper, so that the block dims are powers of two as Triton needs and TPU tiles hold): channels
to a multiple of the block, state to a power of two, length to a multiple of T. Padded tokens
have delta = 0 (a = 1, no input), padded channels and states A = B = C = 0, so they carry the
state through unchanged and contribute nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from layers.pallas import dispatch

DEFAULT_CHUNK = 16  # tokens per saved state when chunk_size is None
MAX_CHUNK = 64  # a chunk is unrolled in the kernels (twice in the backward)
GPU_BLOCK_CHANNELS = 32  # small blocks: more programs to hide the per-token latency
TPU_BLOCK_CHANNELS = 128  # one lane tile
TPU_VMEM_BUDGET = 48 * 2 ** 20  # the blocks of one program, double-buffered, must fit


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _chunk(chunk_size: int | None, length: int) -> int:
  return min(chunk_size or DEFAULT_CHUNK, length)


def _block_channels(channels: int, platform: str) -> int:
  block = TPU_BLOCK_CHANNELS if platform == "tpu" else GPU_BLOCK_CHANNELS
  return min(block, _next_pow2(channels))


def _tpu_vmem_bytes(length: int, block: int, state: int, chunk: int) -> int:
  """VMEM the backward's blocks take on TPU (the larger pass) for a padded length, double-
  buffered; B / C / dB / dC rows are lane-padded to 128, the keep column too."""
  rows = 5 * block + 4 * max(state, 128) + 128  # u, delta, dy, du, ddelta; B, C, dB, dC; keep
  states = (length // chunk) * max(state, 8) * block
  return 2 * 4 * (length * rows + states)


def supports(u, delta, A, B, C, h0, reset, chunk_size) -> str | None:
  """None if the kernel handles this call (arguments as `layers.mamba._prepare` returns them,
  and `chunk_size`), else the reason."""
  del delta, h0, reset
  for name, x in (("B", B), ("C", C)):
    if x.ndim == 2:
      return f"time-invariant {name} ([channels, state]) is not supported"
    if x.ndim == 4 and x.shape[2] != 1:
      return f"grouped {name} ({x.shape[2]} groups) is not supported, only [batch, length, state]"
  if chunk_size is not None and chunk_size > MAX_CHUNK:
    return f"chunk_size {chunk_size} > {MAX_CHUNK} (the kernel unrolls a chunk)"
  if dispatch.platform() == "tpu":
    batch, length, channels = u.shape
    t = _chunk(chunk_size, max(length, 1))
    need = _tpu_vmem_bytes(-(-length // t) * t, _block_channels(channels, "tpu"),
                           _next_pow2(A.shape[1]), t)
    if need > TPU_VMEM_BUDGET:
      return (f"length {length} needs ~{need >> 20} MiB of VMEM per program on TPU "
              f"(> {TPU_VMEM_BUDGET >> 20} MiB)")
  return None


def _compiler_params(platform: str, length: int, state: int, block: int, chunk: int):
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    need = _tpu_vmem_bytes(length, block, state, chunk)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                vmem_limit_bytes=min(need + need // 4 + (4 << 20), 60 << 20))
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=max(1, min(4, state * block // 256)), num_stages=1)
  return None


# --------------------------------------------------------------------------------------------
# Kernels. Refs (leading batch / channel-block dims squeezed): u, delta, y, dy, du, ddelta
# [Lp, bd]; keep [Lp, 1]; B, C, dB, dC [Lp, n]; a (A transposed) [n, bd]; h0, final, dh0, dA
# [n, bd]; states [chunks, n, bd].


def _eye(n: int) -> jax.Array:
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return (rows == cols).astype(jnp.float32)


def _column(row: jax.Array, eye: jax.Array) -> jax.Array:
  """[1, n] -> [n, 1] (a transpose written as a masked reduction)."""
  return jnp.sum(eye * row, axis=1, keepdims=True)


def _row(column: jax.Array, eye: jax.Array) -> jax.Array:
  """[n, 1] -> [1, n]."""
  return jnp.sum(eye * column, axis=0, keepdims=True)


def _load_token(refs, pos, eye):
  """Token pos's (u, delta, keep) rows [1, bd], [1, bd], [1, 1] and B column [n, 1]."""
  u_ref, dt_ref, keep_ref, b_ref = refs
  row = lambda ref: ref[pl.ds(pos, 1), :]
  return row(u_ref), row(dt_ref), row(keep_ref), _column(row(b_ref), eye)


def _forward_kernel(u_ref, dt_ref, keep_ref, b_ref, c_ref, a_ref, h0_ref, *out_refs, chunk,
                    n_chunks, save_states):
  y_ref, final_ref = out_refs[:2]
  a = a_ref[...]
  eye = _eye(a.shape[0])

  def chunk_body(c, h):
    if save_states:
      out_refs[2][c] = h
    start = c * chunk
    tokens = [_load_token((u_ref, dt_ref, keep_ref, b_ref), start + t, eye) for t in range(chunk)]
    cs = [_column(c_ref[pl.ds(start + t, 1), :], eye) for t in range(chunk)]
    ys = []
    for (u, dt, keep, b), c_col in zip(tokens, cs):
      h = keep * jnp.exp(dt * a) * h + b * (dt * u)
      ys.append(jnp.sum(c_col * h, axis=0, keepdims=True))
    for t, y in enumerate(ys):
      y_ref[pl.ds(start + t, 1), :] = y
    return h

  final_ref[...] = lax.fori_loop(0, n_chunks, chunk_body, h0_ref[...])


def _backward_kernel(u_ref, dt_ref, keep_ref, b_ref, c_ref, a_ref, states_ref, dy_ref,
                     dfinal_ref, du_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, *, chunk,
                     n_chunks):
  a = a_ref[...]
  eye = _eye(a.shape[0])

  def chunk_body(k, carry):
    g, da = carry
    start = (n_chunks - 1 - k) * chunk
    tokens = [_load_token((u_ref, dt_ref, keep_ref, b_ref), start + t, eye) for t in range(chunk)]
    # Recompute the chunk's pre-token states prev[t] = h_{t-1} from its saved start. Only
    # those are kept (T states per program); a_t and h_t are recomputed below, which costs one
    # more exp per element and token but halves the live state.
    prev = [states_ref[n_chunks - 1 - k]]
    for u, dt, keep, b in tokens[:-1]:
      prev.append(keep * jnp.exp(dt * a) * prev[-1] + b * (dt * u))
    for t in reversed(range(chunk)):
      pos = start + t
      u, dt, keep, b = tokens[t]
      decay = keep * jnp.exp(dt * a)
      h = decay * prev[t] + b * (dt * u)
      dy = dy_ref[pl.ds(pos, 1), :]
      c_col = _column(c_ref[pl.ds(pos, 1), :], eye)
      dc_ref[pl.ds(pos, 1), :] = _row(jnp.sum(h * dy, axis=1, keepdims=True), eye)
      g = g + c_col * dy
      g_b = jnp.sum(g * b, axis=0, keepdims=True)
      du_ref[pl.ds(pos, 1), :] = dt * g_b
      g_decay = g * prev[t] * decay  # d loss / d (delta_t A), elementwise
      ddt_ref[pl.ds(pos, 1), :] = u * g_b + jnp.sum(g_decay * a, axis=0, keepdims=True)
      da = da + g_decay * dt
      db_ref[pl.ds(pos, 1), :] = _row(jnp.sum(g * (dt * u), axis=1, keepdims=True), eye)
      g = g * decay
    return g, da

  g, da = lax.fori_loop(0, n_chunks, chunk_body, (dfinal_ref[...], jnp.zeros_like(a)))
  dh0_ref[...] = g
  da_ref[...] = da


# --------------------------------------------------------------------------------------------
# pallas_calls on padded, transposed arrays: u, dt [b, Lp, Dp]; keep [b, Lp, 1]; B, C
# [b, Lp, Np]; a [Np, Dp]; h0 [b, Np, Dp].


def _specs(length, state, block, n_chunks):
  spec = lambda shape, index: pl.BlockSpec(shape, index)
  sq = pl.squeezed
  return dict(
      seq=spec((sq, length, block), lambda i, j: (i, 0, j)),
      keep=spec((sq, length, 1), lambda i, j: (i, 0, 0)),
      bc=spec((sq, length, state), lambda i, j: (i, 0, 0)),
      bc_partial=spec((sq, sq, length, state), lambda i, j: (i, j, 0, 0)),
      a=spec((state, block), lambda i, j: (0, j)),
      h=spec((sq, state, block), lambda i, j: (i, 0, j)),
      states=spec((sq, n_chunks, state, block), lambda i, j: (i, 0, 0, j)))


def _forward_call(u, dt, keep, B, C, a, h0, *, chunk, block, interpret, platform, save_states):
  batch, length, channels = u.shape
  state = a.shape[0]
  n_chunks = length // chunk
  s = _specs(length, state, block, n_chunks)
  out_shape = [jax.ShapeDtypeStruct(u.shape, jnp.float32),
               jax.ShapeDtypeStruct(h0.shape, jnp.float32)]
  out_specs = [s["seq"], s["h"]]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((batch, n_chunks, state, channels), jnp.float32))
    out_specs.append(s["states"])
  kernel = functools.partial(_forward_kernel, chunk=chunk, n_chunks=n_chunks,
                             save_states=save_states)
  return pl.pallas_call(
      kernel, grid=(batch, channels // block),
      in_specs=[s["seq"], s["seq"], s["keep"], s["bc"], s["bc"], s["a"], s["h"]],
      out_specs=out_specs, out_shape=out_shape, interpret=interpret,
      compiler_params=_compiler_params(platform, length, state, block, chunk),
      name="selective_scan_forward")(u, dt, keep, B, C, a, h0)


def _backward_call(u, dt, keep, B, C, a, states, dy, dfinal, *, chunk, block, interpret,
                   platform):
  batch, length, channels = u.shape
  state = a.shape[0]
  n_chunks = length // chunk
  n_blocks = channels // block
  s = _specs(length, state, block, n_chunks)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  kernel = functools.partial(_backward_kernel, chunk=chunk, n_chunks=n_chunks)
  du, ddt, db, dc, da, dh0 = pl.pallas_call(
      kernel, grid=(batch, n_blocks),
      in_specs=[s["seq"], s["seq"], s["keep"], s["bc"], s["bc"], s["a"], s["states"], s["seq"],
                s["h"]],
      out_specs=[s["seq"], s["seq"], s["bc_partial"], s["bc_partial"], s["h"], s["h"]],
      out_shape=[f32(u.shape), f32(u.shape), f32((batch, n_blocks, length, state)),
                 f32((batch, n_blocks, length, state)), f32(dfinal.shape), f32(dfinal.shape)],
      interpret=interpret,
      compiler_params=_compiler_params(platform, length, state, block, chunk),
      name="selective_scan_backward")(u, dt, keep, B, C, a, states, dy, dfinal)
  return du, ddt, db.sum(1), dc.sum(1), da.sum(0), dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _scan(u, dt, keep, B, C, a, h0, chunk, block, interpret, platform):
  return tuple(_forward_call(u, dt, keep, B, C, a, h0, chunk=chunk, block=block,
                             interpret=interpret, platform=platform, save_states=False))


def _scan_fwd(u, dt, keep, B, C, a, h0, chunk, block, interpret, platform):
  y, final, states = _forward_call(u, dt, keep, B, C, a, h0, chunk=chunk, block=block,
                                   interpret=interpret, platform=platform, save_states=True)
  return (y, final), (u, dt, keep, B, C, a, states)


def _scan_bwd(chunk, block, interpret, platform, residuals, cotangents):
  u, dt, keep, B, C, a, states = residuals
  dy, dfinal = cotangents
  du, ddt, db, dc, da, dh0 = _backward_call(u, dt, keep, B, C, a, states, dy, dfinal,
                                            chunk=chunk, block=block, interpret=interpret,
                                            platform=platform)
  return du, ddt, jnp.zeros_like(keep), db, dc, da, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(u, delta, A, B, C, h0, reset, chunk_size, *, interpret=None,
                          platform=None):
  """The selective scan as Pallas kernels (forward and custom-VJP backward; module docstring).

  Args (as `layers.mamba._prepare` returns them, float32):
    u, delta: [batch, length, channels] (delta after bias and softplus).
    A: [channels, state].
    B, C: [batch, length, 1, state] (per token, shared by the channels).
    h0: [batch, channels, state] initial state.
    reset: [batch, length] bool, True where the carried state is dropped.
    chunk_size: tokens per saved state (default 16, at most 64); the backward recomputes a
      chunk's states from it.
    interpret: run the kernels in interpret mode (None: `dispatch.interpret_mode()`).
    platform: "gpu" | "tpu" | "cpu" for the compiler parameters and the channel block (None:
      `dispatch.platform()`).

  Returns:
    (y [batch, length, channels] = C_t . h_t, final state [batch, channels, state]), float32.
  """
  reason = supports(u, delta, A, B, C, h0, reset, chunk_size)
  if reason is not None:
    raise ValueError(f"selective_scan_pallas: {reason}")
  interpret = dispatch.interpret_mode() if interpret is None else interpret
  platform = dispatch.platform() if platform is None else platform
  batch, length, channels = u.shape
  state = A.shape[1]
  if length == 0:
    return jnp.zeros(u.shape, jnp.float32), jnp.asarray(h0, jnp.float32)
  chunk = _chunk(chunk_size, length)
  block = _block_channels(channels, platform)
  pad_l = -length % chunk
  pad_d = -channels % block
  pad_n = _next_pow2(state) - state

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  seq = lambda x: jnp.pad(f32(x), ((0, 0), (0, pad_l), (0, pad_d)))
  bc = lambda x: jnp.pad(f32(x)[:, :, 0], ((0, 0), (0, pad_l), (0, pad_n)))
  keep = jnp.pad(1.0 - f32(reset), ((0, 0), (0, pad_l)), constant_values=1.0)[..., None]
  a = jnp.pad(f32(A).T, ((0, pad_n), (0, pad_d)))
  h0 = jnp.pad(jnp.swapaxes(f32(h0), 1, 2), ((0, 0), (0, pad_n), (0, pad_d)))
  y, final = _scan(seq(u), seq(delta), keep, bc(B), bc(C), a, h0, chunk, block, bool(interpret),
                   platform)
  return y[:, :length, :channels], jnp.swapaxes(final[:, :state, :channels], 1, 2)
