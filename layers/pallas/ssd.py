"""Pallas kernel for the Mamba-2 SSD scan (`layers.mamba2.ssd`, impl="pallas").

The recurrence, per batch row and head (scalar decay a_t = dt_t A, state h_t [P, N]):

    h_t = exp(a_t) h_{t-1} + X_t B_t^T,    y_t = h_t C_t (+ D x_t, added outside the kernel)

with X_t = dt_t x_t. A document change at t (segment_ids) drops the carried state: the wrapper
sets a_t = -1e30 there, so exp() of any decay spanning t is exactly 0 (finite, so the masked
matmuls below never meet 0 * inf), and no gradient reaches dt_t A.

Grid (batch, heads); each program owns one (batch row, head), walks the chunks of Q tokens in
order in a `fori_loop` and carries the state h [P, N] in float32 registers. Head h reads B and C
of group h // (H / G) through the BlockSpec index_map (no repeat of B, C per head). Per chunk,
with i, j, k indices inside the chunk, W[i, k] = [k <= i] a_k:

    seg[i, j] = sum_{j<k<=i} a_k = (W @ [j < k])[i, j]    (a matmul: no difference of two large
    cs_i = sum_{k<=i} a_k,  tail_j = sum_{k>j} a_k,         cumulative sums, which would lose
    tot = sum_k a_k                                         float32 precision in exp)
    S    = (C B^T) * exp(seg) * [j <= i]
    y    = S X + exp(cs) * (C h^T)                          (intra-chunk + carried-in state)
    h'   = exp(tot) h + (exp(tail) * X)^T B                 (state leaving the chunk)

The forward under differentiation also writes the state entering every chunk, hs[c] [P, N]. The
backward walks the chunks in reverse, carrying dh = dL/dh' (from the final state's cotangent),
and recomputes each chunk from hs[c] instead of storing per-token states:

    dX = S^T dy + exp(tail) * (B dh^T)        dS = dy X^T,  dG = dS * exp(seg) * [j <= i]
    dC = dG B + exp(cs) * (dy h)              dB = dG^T C + exp(tail) * (X dh)
    dh <- exp(tot) dh + (exp(cs) * dy)^T C    (the cotangent of the state entering the chunk)
    da_k = sum_{i >= k > j} (dS * S)[i, j] + sum_{i >= k} dcs_i + sum_{j < k} dtail_j + dtot
      with dcs = exp(cs) * rowsum(dy * (C h^T)), dtail = exp(tail) * rowsum(X * (B dh^T)),
      dtot = exp(tot) sum(h * dh)

B and C gradients come out per head and are summed over each group's heads outside the kernel;
dt, A, x, D gradients follow from dX and da by autodiff of the elementwise wrapper. Everything
inside the kernels is float32 (inputs are cast by the wrapper), and so are the matmuls' results.
Where x, B and C are bf16 the matmuls take bf16 operands (the tensor cores' / MXU's input; about
3e-3 relative error against the float32 reference, flat in the length), except the masked
cumulative sums (seg, and r in the backward), which stay at float32 accuracy as exp() of a decay
must; float32 accuracy is three TF32 tensor-core passes for the GPU driver (emulated where it is
interpreted) and HIGHEST for the TPU one (`layers.pallas.precision`).

Block shapes: the wrapper pads Q, P, N to powers of two >= 16 (Triton's tensor sizes and tl.dot
minimum) and lays arrays out as [batch, heads, chunks, Q, P]; every block holds one (batch, head)
whole, so its last two dims are the full array dims (TPU tiling) and the kernel indexes chunks on
a leading dim. Lowerings: on GPU the Triton lowering (`plgpu.CompilerParams`): one program per
(batch, head) running a sequential loop of small matmuls suits it, and it runs on A100 and H100
alike; on TPU Mosaic (both grid dims "parallel"), where each program's whole sequence must fit in
VMEM, which `supports` checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from layers.pallas import dispatch
from layers.pallas import precision

Array = jax.Array

_RESET = -1e30  # a_t at a document change: exp(any sum containing it) == 0, and stays finite
_MIN_BLOCK = 16  # tl.dot needs every matmul dim >= 16
_MAX_CHUNK = 64  # [Q, Q] float32 intermediates per program
# GPU: Q * max(P, N) (padded) at most this. Compiled for sm_90 at P = N = 128 with float32 inputs,
# chunk 64 needs 160 KiB (forward) and 256 KiB (backward) of shared memory, over an H100's 227
# KiB; chunk 32 128 KiB. With bf16 matmul operands chunk 64 needs 96 and 176 KiB.
_GPU_CHUNK_BY_DIM = 32 * 128
_GPU_CHUNK_BY_DIM_BF16 = 64 * 128
_MAX_STATE = 128 * 128  # padded P * N held in registers / vmem per program
_TPU_VMEM_BUDGET = 12 * 2**20  # bytes of double-buffered blocks per program (default limit 16 MiB)
_DTYPES = (jnp.float32, jnp.bfloat16)


def _pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _bf16_inputs(x, B, C) -> bool:
  """Whether the kernels' matmuls take bf16 operands (`_dot`): x, B and C are bf16."""
  return all(jnp.dtype(v.dtype) == jnp.dtype(jnp.bfloat16) for v in (x, B, C))


def _sizes(length: int, head_dim: int, d_state: int, chunk_size: int, platform: str,
           bf16: bool) -> tuple[int, int, int, int]:
  """(q, n_chunks, padded head_dim, padded d_state): q a power of two in [16, 64] (on GPU at
  most 4096 / max(padded head_dim, d_state), 8192 / ... with bf16 matmul operands)."""
  p, n = max(_pow2(head_dim), _MIN_BLOCK), max(_pow2(d_state), _MIN_BLOCK)
  q = min(1 << (int(chunk_size).bit_length() - 1), _pow2(length), _MAX_CHUNK)
  if platform != "tpu":  # the GPU driver (on CPU: interpreted, with the GPU's limits)
    q = min(q, (_GPU_CHUNK_BY_DIM_BF16 if bf16 else _GPU_CHUNK_BY_DIM) // max(p, n))
  q = max(q, _MIN_BLOCK)
  return q, -(-length // q), p, n


def supports(x, dt, A, B, C, D=None, *, chunk_size: int = 64, initial_state=None,
             segment_ids=None, platform: str | None = None) -> str | None:
  """None if `ssd_pallas` handles this call, else a one-line reason. Arguments as validated by
  `layers.mamba2.ssd` (arrays, or anything with .shape and .dtype); platform None ->
  `dispatch.platform()` (only "tpu" adds a check: the VMEM the whole-sequence blocks need)."""
  named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state)
  for name, arr in named.items():
    if arr is not None and arr.dtype not in _DTYPES:
      return (f"{name} has dtype {arr.dtype}; the kernel takes float32 or bfloat16 (it computes "
              "in float32)")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    return f"chunk_size must be a positive int, got {chunk_size!r}"
  _, length, _, head_dim = x.shape
  d_state = B.shape[-1]
  platform = platform or dispatch.platform()
  q, n_chunks, p, n = _sizes(length, head_dim, d_state, chunk_size, platform,
                             _bf16_inputs(x, B, C))
  if p * n > _MAX_STATE:
    return (f"head_dim x d_state = {head_dim} x {d_state} (padded {p} x {n}) exceeds the "
            f"{_MAX_STATE}-element state one program holds")
  if platform == "tpu":
    # The backward's blocks (the larger pass), float32, double-buffered; a and da rows [1, Q]
    # take an (8, 128) tile each.
    rows = n_chunks * q
    vmem = 2 * 4 * (3 * rows * p + 4 * rows * n + 2 * n_chunks * 8 * 128 + (n_chunks + 2) * p * n)
    if vmem > _TPU_VMEM_BUDGET:
      return (f"length {length} needs ~{vmem >> 20} MiB of VMEM per (batch, head) program, over "
              f"the {_TPU_VMEM_BUDGET >> 20} MiB budget")
  return None


def _compiler_params(platform: str | None, p: int, n: int):
  platform = platform or dispatch.platform()
  if platform == "gpu":
    from jax.experimental.pallas import triton as plgpu
    # One stage: software-pipelining the chunk loop's loads would take shared memory the
    # matmuls need (160 vs 256 KiB for the forward at Q = 64, P = N = 128).
    return plgpu.CompilerParams(num_warps=4 if p * n <= 64 * 64 else 8, num_stages=1)
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  return None


# ---------------------------------------------------------------------------------------------
# Kernels. Refs hold one (batch, head): x, y [nc, Q, P]; a [nc, 1, Q]; B, C [nc, Q, N];
# states [nc, P, N]; h0, final [P, N].


def _dot(a, b, ta=False, tb=False, exact=False, *, platform, interpret, bf16):
  """a @ b with optional transposes in a kernel for `platform`, float32 result: with bf16
  operands where the inputs are bf16 (`bf16`) unless `exact`, else at float32 accuracy
  (`layers.pallas.precision`). The kernels get it with the keyword arguments bound."""
  dims = ((((0,) if ta else (1,)), ((1,) if tb else (0,))), ((), ()))
  return precision.dot_general(a, b, dims, platform=platform, interpret=interpret,
                               bf16_operands=bf16 and not exact)


def _chunk_terms(a, bm, cm, dot):
  """Per-chunk decay terms from a [1, Q] (row) and B, C [Q, N]:
  (S0 = (C B^T) masked, L = exp(seg) masked, exp(cs) [Q,1], exp(tail) [Q,1], exp(tot) [1,1])."""
  q = a.shape[-1]
  row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  causal = col <= row
  w = jnp.where(causal, a, 0.0)  # w[i, k] = [k <= i] a_k
  seg = dot(w, (col < row).astype(jnp.float32), exact=True)  # sum_k [k <= i] a_k [j < k]
  lmat = jnp.where(causal, jnp.exp(seg), 0.0)
  cs = jnp.sum(w, axis=1, keepdims=True)
  tail = jnp.sum(jnp.where(col > row, a, 0.0), axis=1, keepdims=True)
  tot = jnp.sum(a, axis=1, keepdims=True)
  return dot(cm, bm, tb=True), lmat, jnp.exp(cs), jnp.exp(tail), jnp.exp(tot)


def _forward_kernel(x_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, final_ref, states_ref=None, *,
                    dot):
  def body(c, h):
    x, a, bm, cm = x_ref[c], a_ref[c], b_ref[c], c_ref[c]
    if states_ref is not None:
      states_ref[c] = h
    g, lmat, ecs, etail, etot = _chunk_terms(a, bm, cm, dot)
    y_ref[c] = dot(g * lmat, x) + ecs * dot(cm, h, tb=True)
    return etot * h + dot(etail * x, bm, ta=True)

  final_ref[...] = lax.fori_loop(0, x_ref.shape[0], body, h0_ref[...])


def _backward_kernel(x_ref, a_ref, b_ref, c_ref, states_ref, dy_ref, dfinal_ref,
                     dx_ref, da_ref, db_ref, dc_ref, dh0_ref, *, dot):
  n_chunks = x_ref.shape[0]

  def body(i, dh):
    c = n_chunks - 1 - i
    x, a, bm, cm, h, dy = x_ref[c], a_ref[c], b_ref[c], c_ref[c], states_ref[c], dy_ref[c]
    g, lmat, ecs, etail, etot = _chunk_terms(a, bm, cm, dot)
    s = g * lmat
    b_dh = dot(bm, dh, tb=True)  # [Q, P]
    ds = dot(dy, x, tb=True)  # [Q(i), Q(j)]
    dg = ds * lmat
    dx_ref[c] = dot(s, dy, ta=True) + etail * b_dh
    dc_ref[c] = dot(dg, bm) + ecs * dot(dy, h)
    db_ref[c] = dot(dg, cm, ta=True) + etail * dot(x, dh)
    # da_k: rows i (or j) of the [Q, Q] masks below, columns k.
    q = a.shape[-1]
    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    r = dot(ds * s, (row < col).astype(jnp.float32), exact=True)  # sum_{j<k} dseg[i, j]
    dcs = ecs * jnp.sum(dy * dot(cm, h, tb=True), axis=1, keepdims=True)  # [Q, 1]
    dtail = etail * jnp.sum(x * b_dh, axis=1, keepdims=True)  # [Q, 1]
    dtot = etot * jnp.sum(jnp.sum(h * dh, axis=1, keepdims=True), axis=0, keepdims=True)
    da = (jnp.sum(jnp.where(row >= col, r + dcs, 0.0), axis=0, keepdims=True)
          + jnp.sum(jnp.where(row < col, dtail, 0.0), axis=0, keepdims=True) + dtot)
    da_ref[c] = da
    return etot * dh + dot(ecs * dy, cm, ta=True)

  dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dfinal_ref[...])


# ---------------------------------------------------------------------------------------------
# pallas_calls and their custom_vjp. Shapes: X [b, H, nc, Q, P], a [b, H, nc, 1, Q],
# B, C [b, G, nc, Q, N], h0 [b, H, P, N]; all float32.


def _specs(shape, rep=1):
  """BlockSpec of one (batch, head) of an array [b, H or G, ...]; heads read group h // rep
  (lax.div: jnp's floor division lowers through sign(), whose Mosaic rule asks for the TPU
  model, so lowering from a CPU host would fail)."""
  return pl.BlockSpec((None, None) + tuple(shape[2:]),
                      lambda i, h: (i, lax.div(h, rep)) + (0,) * (len(shape) - 2))


def _kernel_dot(platform, interpret, bf16):
  return functools.partial(_dot, platform=platform or dispatch.platform(), interpret=interpret,
                           bf16=bf16)


def _forward(X, a, B, C, h0, rep, interpret, platform, bf16, save_states):
  batch, heads, n_chunks, q, p = X.shape
  n = B.shape[-1]
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct(X.shape, f32), jax.ShapeDtypeStruct(h0.shape, f32)]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, n_chunks, p, n), f32))
  return pl.pallas_call(
      functools.partial(_forward_kernel, dot=_kernel_dot(platform, interpret, bf16)),
      out_shape=out_shape, grid=(batch, heads),
      in_specs=[_specs(X.shape), _specs(a.shape), _specs(B.shape, rep), _specs(C.shape, rep),
                _specs(h0.shape)],
      out_specs=[_specs(s.shape) for s in out_shape],
      compiler_params=_compiler_params(platform, p, n), interpret=interpret,
      name="ssd_forward")(X, a, B, C, h0)


def _backward(X, a, B, C, states, dy, dfinal, rep, interpret, platform, bf16):
  batch, heads, n_chunks, q, p = X.shape
  n = B.shape[-1]
  f32 = jnp.float32
  per_head = (batch, heads) + B.shape[2:]
  out_shape = [jax.ShapeDtypeStruct(X.shape, f32), jax.ShapeDtypeStruct(a.shape, f32),
               jax.ShapeDtypeStruct(per_head, f32), jax.ShapeDtypeStruct(per_head, f32),
               jax.ShapeDtypeStruct(dfinal.shape, f32)]
  return pl.pallas_call(
      functools.partial(_backward_kernel, dot=_kernel_dot(platform, interpret, bf16)),
      out_shape=out_shape, grid=(batch, heads),
      in_specs=[_specs(X.shape), _specs(a.shape), _specs(B.shape, rep), _specs(C.shape, rep),
                _specs(states.shape), _specs(dy.shape), _specs(dfinal.shape)],
      out_specs=[_specs(s.shape) for s in out_shape],
      compiler_params=_compiler_params(platform, p, n), interpret=interpret,
      name="ssd_backward")(X, a, B, C, states, dy, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ssd_core(X, a, B, C, h0, rep, interpret, platform, bf16):
  return tuple(_forward(X, a, B, C, h0, rep, interpret, platform, bf16, save_states=False))


def _ssd_core_fwd(X, a, B, C, h0, rep, interpret, platform, bf16):
  y, final, states = _forward(X, a, B, C, h0, rep, interpret, platform, bf16, save_states=True)
  return (y, final), (X, a, B, C, states)


def _ssd_core_bwd(rep, interpret, platform, bf16, res, cotangents):
  X, a, B, C, states = res
  dy, dfinal = cotangents
  dX, da, dB, dC, dh0 = _backward(X, a, B, C, states, dy, dfinal, rep, interpret, platform,
                                  bf16)
  groups = B.shape[1]
  dB = dB.reshape((dB.shape[0], groups, rep) + dB.shape[2:]).sum(axis=2)
  dC = dC.reshape((dC.shape[0], groups, rep) + dC.shape[2:]).sum(axis=2)
  return dX, da, dB, dC, dh0


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def ssd_pallas(x, dt, A, B, C, D=None, *, chunk_size: int = 64, initial_state=None,
               segment_ids=None, interpret: bool | None = None,
               platform: str | None = None) -> tuple[Array, Array]:
  """`layers.mamba2.ssd` as a Pallas kernel; same arguments (as validated by it) and outputs.

  x [batch, L, H, P], dt [batch, L, H], A [H], B, C [batch, L, G, N], D [H] or None,
  initial_state [batch, H, P, N] or None, segment_ids [batch, L] or None. Returns y [batch, L, H,
  P] in x's dtype and the final state [batch, H, P, N] float32. chunk_size picks the kernel's
  chunk: the largest power of two <= chunk_size, clamped to [16, 64] and to the padded length
  (on GPU also to 4096 / max(P, N) padded, 8192 / ... for bf16 x, B, C: at P = N = 128, 32 and
  64). interpret: None ->
  `dispatch.interpret_mode()`; platform (None -> `dispatch.platform()`) picks the compiler params
  ("gpu": Triton, "tpu": Mosaic), the GPU chunk cap and the matmul precision.
  """
  reason = supports(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                    segment_ids=segment_ids, platform=platform)
  if reason is not None:
    raise ValueError(f"ssd: impl='pallas' does not support this call: {reason}")
  if interpret is None:
    interpret = dispatch.interpret_mode()
  batch, length, heads, head_dim = x.shape
  groups, d_state = B.shape[2:]
  platform = platform or dispatch.platform()
  bf16 = _bf16_inputs(x, B, C)
  q, n_chunks, p, n = _sizes(length, head_dim, d_state, chunk_size, platform, bf16)
  pad = n_chunks * q - length
  f32 = jnp.float32
  # One cast per input, so each gradient returns through a single cast into the input dtype.
  xf, dtf, Af, Bf, Cf = (v.astype(f32) for v in (x, dt, A, B, C))

  a = dtf * Af  # [b, L, H]
  if segment_ids is not None:
    reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    a = jnp.where(reset[..., None], _RESET, a)

  def blocks(v, last):  # [b, L, H, d] -> [b, H, nc, Q, last] zero-padded
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, last - v.shape[-1])))
    return jnp.moveaxis(v, 2, 1).reshape(v.shape[0], v.shape[2], n_chunks, q, last)

  X = blocks(dtf[..., None] * xf, p)
  a = blocks(a[..., None], 1).swapaxes(-1, -2)  # [b, H, nc, 1, Q]
  if initial_state is None:
    h0 = jnp.zeros((batch, heads, p, n), f32)
  else:
    h0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, p - head_dim), (0, n - d_state)))
  y, final = _ssd_core(X, a, blocks(Bf, n), blocks(Cf, n), h0, heads // groups, bool(interpret),
                       platform, bf16)
  y = jnp.moveaxis(y.reshape(batch, heads, n_chunks * q, p)[:, :, :length, :head_dim], 1, 2)
  if D is not None:
    y = y + D.astype(f32)[:, None] * xf
  return y.astype(x.dtype), final[:, :, :head_dim, :d_state]
