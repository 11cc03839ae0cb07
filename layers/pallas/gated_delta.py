"""Pallas kernel for the gated delta rule (`layers.gated_delta.gated_delta_rule`, impl="pallas").

The recurrence, per value head, state S [dk, dv] in float32:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale S_t^T q_t

computed chunk by chunk in the WY / UT form of `gated_delta_rule_chunked` (see its docstring for
the derivation). Per chunk of C tokens entered with the state S (D[i, j] = exp(sum_{j<m<=i} g_m)
for j <= i in the same document, gamma_i = exp(sum_{m<=i} g_m) before the chunk's first reset):

    T = (I + strictly_lower(diag(beta) (K K^T) * D))^{-1}
    W = T diag(beta gamma) K,   U = T diag(beta) V - W S                     (the new values)
    O = scale [diag(gamma) Q S + ((Q K^T) * D) U]
    S <- gamma_{C-1} S + (diag(D[C-1, :]) K)^T U

T is built without `triangular_solve`: the 16 x 16 diagonal blocks by forward substitution (15
steps, each a masked [C, C] matmul updating row r of every block), then merged by
T <- T - T M21 T (M21: the lower-left halves of the diagonal 2s-blocks), log2(C / 16) times: the
algorithm (and the rounding) of the XLA form. D is a masked cumulative sum (a matmul with a 0/1
matrix), never Gamma_i - Gamma_j, so large decays keep full precision.

Grid: (batch, value heads, dv / block_v). Columns of S evolve independently (T, W, D depend only
on q, k, g, beta), so each program owns a [dk, block_v] slice of one head's state and recomputes
the chunk matrices of its head: more programs and fewer registers per program, for the price of
recomputing T. Grouped heads read their q/k head h // (Hv / Hk) through the index map (no
repeat in memory). Everything in a program is float32 (inputs cast after loading), and so are
the matmuls' results. Their operands: where q, k and v are bf16, the products with q, k, v, the
state and their cotangents take bf16 operands (the tensor cores' / MXU's native input, as in flash
attention; about 4e-3 relative error against the float32 reference, flat in the length), while
the masked cumulative sums of g and the substitution for T stay at float32 accuracy, where
rounding would move exp() of large decays. float32 accuracy is three TF32 tensor-core passes for
the GPU driver (emulated where it is interpreted) and HIGHEST for the TPU one
(`layers.pallas.precision`). On GPU the chunk is capped at 64 and at 4096 / dk for float32 inputs
(8192 / dk for bf16) so that a program's blocks fit its registers and shared memory.

Two drivers of the same chunk step:
  GPU (and interpret mode on CPU): one program holds its head's whole sequence as [n, C, d]
    blocks and walks the n chunks in a `fori_loop`, the state a loop carry. This is the Triton
    lowering (`jax.experimental.pallas.triton`): its blocks are pointers, so the sequence length
    costs no on-chip memory, and it handles a sequential loop over chunks with small matmuls well;
    it runs on A100 and H100 alike (no Hopper-only features). All block dims are powers of 2 (C,
    and dk, dv padded with zeros in the wrapper; zero k/q/v columns change nothing).
  TPU: the chunks are the last grid axis ("arbitrary", sequential), blocks are one chunk
    ([C, dk], [C, block_v]: full minor dims or multiples of 128), the state lives in a VMEM
    scratch across grid steps, so VMEM use does not grow with the length.

Forward outputs: O, the final state, and the state entering every chunk ([n, dk, dv] per head,
like the XLA form's autodiff residuals). Backward (`jax.custom_vjp`): a second kernel walks the
chunks in reverse with dS (starting from the final state's cotangent), reloads the saved state
entering the chunk, recomputes D, gamma, T, W, U from it and the inputs, and emits dq, dk, dv, dg,
dbeta of the chunk and dS of the previous one (S_0's cotangent at the end):

    dU  = P^T dO' + (D_end K) dS'          (dO' = scale dO, P = (Q K^T) * D, D_end = D[C-1, :])
    dS  = gamma_end dS' + (gamma Q)^T dO' - W^T dU
    dW  = -dU S^T,   dK~ = T^T dW,   dV~ = T^T dU,   dA = -strictly_lower(dK~ W^T + dV~ U~^T)
    dV  = beta dV~,  dK += beta gamma dK~ + (dA' + dA'^T) K + (dP * D)^T Q,  dA' = dA beta D

and dg from dD * D (through the masked cumulative sums) and d gamma * gamma. q/k gradients come
out per value head and block_v slice (float32) and are summed in the wrapper.
Padding: lengths are padded to a multiple of C with q = k = v = g = beta = 0 (no effect on the
state; outputs sliced off).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from layers.gated_delta import _check, _resets
from layers.pallas import dispatch
from layers.pallas import precision

Array = jax.Array

_F32 = jnp.float32
_BLOCK = 16  # diagonal blocks of T solved by substitution
_MAX_DIM_K = 256  # a program holds [C, dk] blocks and a [dk, block_v] state
# GPU: C * dk_padded at most this. Compiled for sm_90 at dk = 128 with float32 inputs, chunk 64's
# backward needs 288 KiB of shared memory (an H100 has 227 KiB), chunk 32's 112 KiB; with bf16
# matmul operands chunk 64 needs 128 KiB (forward) and 168 KiB (backward).
_GPU_CHUNK_BY_DIM_K = 32 * 128
_GPU_CHUNK_BY_DIM_K_BF16 = 64 * 128


def _pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def supports(q: Array, k: Array, v: Array, g: Array, beta: Array,
             initial_state: Array | None = None, segment_ids: Array | None = None, *,
             chunk_size: int = 64) -> str | None:
  """None if the kernel handles this (validated) call, else the reason."""
  del segment_ids  # any ids
  arrays = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
  for name, a in arrays.items():
    if a is not None and jnp.dtype(a.dtype) not in (jnp.dtype(_F32), jnp.dtype(jnp.bfloat16)):
      return f"{name} has dtype {jnp.dtype(a.dtype).name} (the kernel takes float32 and bfloat16)"
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 16 or chunk_size > 128 or chunk_size & (chunk_size - 1)):
    return f"chunk_size={chunk_size!r} (the kernel needs a power of 2 in [16, 128])"
  if q.shape[-1] > _MAX_DIM_K:
    return f"dim_k = {q.shape[-1]} > {_MAX_DIM_K} (the kernel's per-program blocks)"
  return None


class _Dots(NamedTuple):
  """The matmuls of a kernel for `platform`, float32 results. `exact_mm`: float32 accuracy
  (`layers.pallas.precision`), for the masked cumulative sums of g and for T. The others (the
  products with q, k, v, the state and their cotangents) take bf16 operands where the inputs are
  bf16 (`bf16`), as flash attention does, and float32 accuracy otherwise."""
  platform: str
  interpret: Any
  bf16: bool

  def _dot(self, a: Array, b: Array, contract: tuple[int, int], exact: bool = False) -> Array:
    return precision.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                                 platform=self.platform, interpret=self.interpret,
                                 bf16_operands=self.bf16 and not exact)

  def exact_mm(self, a: Array, b: Array) -> Array:  # a @ b at float32 accuracy
    return self._dot(a, b, (1, 0), exact=True)

  def mm(self, a: Array, b: Array) -> Array:  # a @ b
    return self._dot(a, b, (1, 0))

  def mm_nt(self, a: Array, b: Array) -> Array:  # a @ b^T
    return self._dot(a, b, (1, 1))

  def mm_tn(self, a: Array, b: Array) -> Array:  # a^T @ b
    return self._dot(a, b, (0, 0))


class _Config(NamedTuple):
  scale: float
  chunk: int
  n_chunks: int
  block_v: int
  group: int  # value heads per q/k head
  tpu: bool  # chunks as the last grid axis, state in VMEM scratch
  interpret: object  # bool or pltpu.InterpretParams
  platform: str
  bf16: bool  # q, k and v are bf16: bf16 operands in the matmuls with them (`_Dots`)

  @property
  def dots(self) -> _Dots:
    return _Dots(self.platform, self.interpret, self.bf16)


# ------------------------------------------------------------------------------ the chunk math


class _Iota(NamedTuple):
  row: Array  # [C, C] row index i
  col: Array  # [C, C] column index j
  last: Array  # [C, 1] bool: i == C - 1

  @classmethod
  def make(cls, c: int) -> "_Iota":
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return cls(row, col, lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1)

  def to_col(self, x: Array) -> Array:
    """[1, C] -> [C, 1] (a masked reduction: no vector transpose)."""
    return jnp.sum(jnp.where(self.row == self.col, x, 0.0), axis=1, keepdims=True)

  def to_row(self, x: Array) -> Array:
    """[C, 1] -> [1, C]."""
    return jnp.sum(jnp.where(self.row == self.col, x, 0.0), axis=0, keepdims=True)


def _unit_lower_inverse(a: Array, ix: _Iota, dots: _Dots) -> Array:
  """(I + a)^{-1} for strictly lower-triangular a [C, C]: 16 x 16 diagonal blocks by forward
  substitution (row r of every block at step r: T_i = e_i - sum_{j<i} a_ij T_j), then merges
  [[T11, 0], [M21, T22]] -> T21 = -T22 M21 T11, all as masked [C, C] matmuls."""
  c = a.shape[0]
  base = min(_BLOCK, c)
  shift = base.bit_length() - 1
  row, col = ix.row, ix.col
  a_diag = jnp.where((row >> shift) == (col >> shift), a, 0.0)
  in_block = row & (base - 1)

  def substitute(r, t):
    return t - dots.exact_mm(jnp.where(in_block == r, a_diag, 0.0), t)

  t = lax.fori_loop(1, base, substitute, (row == col).astype(_F32))
  s, shift = base, shift
  while s < c:
    # The lower-left s x s block of every diagonal 2s x 2s block (a is 0 above the diagonal).
    m21 = jnp.where(((row >> (shift + 1)) == (col >> (shift + 1)))
                    & ((row >> shift) != (col >> shift)), a, 0.0)
    t = t - dots.exact_mm(t, dots.exact_mm(m21, t))
    s, shift = 2 * s, shift + 1
  return t


class _Chunk(NamedTuple):
  d: Array  # [C, C] D (0 above the diagonal and across resets)
  gam: Array  # [C, 1] gamma
  dend: Array  # [C, 1] D[C-1, j]
  gend: Array  # [1, 1] gamma_{C-1}
  b: Array  # [C, 1] beta
  kk: Array  # [C, C] K K^T
  qk: Array  # [C, C] Q K^T
  t: Array  # [C, C] (I + A)^{-1}
  w: Array  # [C, dk] W
  ut: Array  # [C, block_v] T diag(beta) V
  u: Array  # [C, block_v] U


def _chunk(q, k, v, g, beta, n, s, ix: _Iota, dots: _Dots) -> _Chunk:
  """The chunk's matrices from q, k [C, dk], v [C, block_v], g, beta, n (resets so far) [1, C]
  and the entering state s [dk, block_v], all float32."""
  row, col = ix.row, ix.col
  lower, strict = col <= row, col < row
  n_col = ix.to_col(n)
  keep = lower & (n_col == n)
  g_lower = jnp.where(lower, g, 0.0)
  seg = dots.exact_mm(g_lower, strict.astype(_F32))  # sum_{j<m<=i} g_m
  d = jnp.where(keep, jnp.exp(jnp.where(keep, seg, 0.0)), 0.0)
  start = n_col == 0.0
  cum = jnp.sum(g_lower, axis=1, keepdims=True)  # sum_{m<=i} g_m
  gam = jnp.where(start, jnp.exp(jnp.where(start, cum, 0.0)), 0.0)
  dend = ix.to_col(jnp.sum(jnp.where(row == col.shape[0] - 1, d, 0.0), axis=0, keepdims=True))
  gend = jnp.sum(jnp.where(ix.last, gam, 0.0), axis=0, keepdims=True)
  b = ix.to_col(beta)
  kk = dots.mm_nt(k, k)
  t = _unit_lower_inverse(jnp.where(strict, b * kk * d, 0.0), ix, dots)
  w = dots.mm(t, (b * gam) * k)
  ut = dots.mm(t, b * v)
  u = ut - dots.mm(w, s)
  return _Chunk(d, gam, dend, gend, b, kk, dots.mm_nt(q, k), t, w, ut, u)


def _chunk_forward(q, k, v, g, beta, n, s, scale, dots: _Dots):
  """(O [C, block_v], the state leaving the chunk)."""
  x = _chunk(q, k, v, g, beta, n, s, _Iota.make(q.shape[0]), dots)
  o = scale * (dots.mm(x.gam * q, s) + dots.mm(x.qk * x.d, x.u))
  return o, x.gend * s + dots.mm_tn(x.dend * k, x.u)


def _chunk_backward(q, k, v, g, beta, n, s, do, ds_next, scale, dots: _Dots):
  """Cotangents (dq, dk [C, dk], dv [C, block_v], dg, dbeta [1, C]) of the chunk and that of the
  entering state, from the output's do [C, block_v] and the leaving state's ds_next."""
  ix = _Iota.make(q.shape[0])
  row, col = ix.row, ix.col
  x = _chunk(q, k, v, g, beta, n, s, ix, dots)
  do = scale * do
  k_end = x.dend * k
  du = dots.mm_tn(x.qk * x.d, do) + dots.mm(k_end, ds_next)
  dp = dots.mm_nt(do, x.u)
  ds = x.gend * ds_next + dots.mm_tn(x.gam * q, do) - dots.mm_tn(x.w, du)
  dgend = jnp.sum(jnp.sum(s * ds_next, axis=1, keepdims=True), axis=0, keepdims=True)
  dqs = dots.mm_nt(do, s)  # d(gamma Q)
  dq = x.gam * dqs
  dgam = jnp.sum(q * dqs, axis=1, keepdims=True)
  dk_end = dots.mm_nt(x.u, ds_next)
  dk = x.dend * dk_end
  ddend = jnp.sum(k * dk_end, axis=1, keepdims=True)
  dkb = dots.mm_tn(x.t, -dots.mm_nt(du, s))  # T^T dW
  dvb = dots.mm_tn(x.t, du)  # T^T dU~
  da = -jnp.where(col < row, dots.mm_nt(dkb, x.w) + dots.mm_nt(dvb, x.ut), 0.0)
  dv = x.b * dvb
  kdkb = jnp.sum(k * dkb, axis=1, keepdims=True)
  dk = dk + (x.b * x.gam) * dkb
  db = jnp.sum(v * dvb, axis=1, keepdims=True) + x.gam * kdkb
  dgam = dgam + x.b * kdkb
  db = db + jnp.sum(da * x.kk * x.d, axis=1, keepdims=True)
  dkk = da * x.b * x.d
  dqk = dp * x.d
  dk = dk + dots.mm(dkk, k) + dots.mm_tn(dkk, k) + dots.mm_tn(dqk, q)
  dq = dq + dots.mm(dqk, k)
  dd = da * x.b * x.kk + dp * x.qk + jnp.where(row == col.shape[0] - 1, ix.to_row(ddend), 0.0)
  dgam = dgam + jnp.where(ix.last, dgend, 0.0)
  # g_m enters D[i, j] for j < m <= i and gamma_i for m <= i.
  dseg = dots.exact_mm(dd * x.d, (col > row).astype(_F32))  # [i, m] = sum_{j<m} dD_ij D_ij
  dg = jnp.sum(jnp.where(row >= col, dseg + dgam * x.gam, 0.0), axis=0, keepdims=True)
  return (dq, dk, dv, dg, ix.to_row(db)), ds


# ------------------------------------------------------------------------------ the kernels


def _drive(cfg: _Config, step, carry_in_ref, carry_out_ref, scratch, reverse: bool):
  """Runs step(at, carry) -> carry over the chunks: `at(ref)` is the chunk's view of a ref.
  GPU/interpret: a fori_loop over the [n, ...] blocks; TPU: one chunk per grid step (axis 3),
  the carry in a VMEM scratch."""
  if cfg.tpu:
    (carry_ref,) = scratch
    i = pl.program_id(3)

    @pl.when(i == 0)
    def _():
      carry_ref[...] = carry_in_ref[...]

    carry = step(lambda ref: ref, carry_ref[...])
    carry_ref[...] = carry

    @pl.when(i == cfg.n_chunks - 1)
    def _():
      carry_out_ref[...] = carry
  else:
    def body(j, carry):
      i = cfg.n_chunks - 1 - j if reverse else j
      return step(lambda ref: ref.at[i], carry)

    carry_out_ref[...] = lax.fori_loop(0, cfg.n_chunks, body, carry_in_ref[...])


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, n_ref, s0_ref, o_ref, final_ref,
                    states_ref, *scratch, cfg: _Config):
  def step(at, s):
    load = lambda ref: at(ref)[...].astype(_F32)
    at(states_ref)[...] = s
    o, s = _chunk_forward(*map(load, (q_ref, k_ref, v_ref, g_ref, b_ref, n_ref)), s, cfg.scale,
                          cfg.dots)
    at(o_ref)[...] = o.astype(o_ref.dtype)
    return s

  _drive(cfg, step, s0_ref, final_ref, scratch, reverse=False)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, n_ref, states_ref, do_ref, dfinal_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, *scratch, cfg: _Config):
  def step(at, ds):
    load = lambda ref: at(ref)[...].astype(_F32)
    inputs = map(load, (q_ref, k_ref, v_ref, g_ref, b_ref, n_ref, states_ref, do_ref))
    grads, ds = _chunk_backward(*inputs, ds, cfg.scale, cfg.dots)
    for ref, grad in zip((dq_ref, dk_ref, dv_ref, dg_ref, db_ref), grads):
      at(ref)[...] = grad
    return ds

  _drive(cfg, step, dfinal_ref, ds0_ref, scratch, reverse=True)


def _spec(cfg: _Config, shape: tuple[int, ...], index, *, v_cols: bool = False,
          per_chunk: bool = True, reverse: bool = False) -> pl.BlockSpec:
  """BlockSpec of an array [*lead, n, *shape] (per_chunk) or [*lead, *shape]; `index` maps the
  program (b, h, j) to the leading (squeezed) block indices; with v_cols the last dim is the
  value block j of the state's columns (width block_v)."""
  n_lead = len(index(0, 0, 0))
  minor = lambda j: (0,) * (len(shape) - 1) + (j if v_cols else 0,)
  if not per_chunk:
    return pl.BlockSpec((None,) * n_lead + shape,
                        lambda b, h, j, *i: (*index(b, h, j), *minor(j)))
  if cfg.tpu:  # one chunk per step of the last grid axis
    chunk = (lambda i: cfg.n_chunks - 1 - i) if reverse else (lambda i: i)
    return pl.BlockSpec((None,) * (n_lead + 1) + shape,
                        lambda b, h, j, i: (*index(b, h, j), chunk(i), *minor(j)))
  return pl.BlockSpec((None,) * n_lead + (cfg.n_chunks,) + shape,
                      lambda b, h, j: (*index(b, h, j), 0, *minor(j)))


def _input_specs(cfg: _Config, c: int, dkp: int, reverse: bool) -> dict[str, pl.BlockSpec]:
  """Specs of the inputs both kernels share (and of the state-shaped arrays)."""
  head = lambda b, h, j: (b, h)
  qk_head = lambda b, h, j: (b, lax.div(h, cfg.group))  # not h // group: no sign op in index maps
  bv = cfg.block_v
  return dict(
      qk=_spec(cfg, (c, dkp), qk_head, reverse=reverse),
      v=_spec(cfg, (c, bv), head, v_cols=True, reverse=reverse),
      row=_spec(cfg, (1, c), head, reverse=reverse),
      nres=_spec(cfg, (1, c), lambda b, h, j: (b,), reverse=reverse),
      state=_spec(cfg, (dkp, bv), head, v_cols=True, per_chunk=False),
      states=_spec(cfg, (dkp, bv), head, v_cols=True, reverse=reverse))


def _call(cfg: _Config, kernel, name: str, in_specs, out_specs, out_shape, grid3, carry_shape):
  """The pallas_call over (batch, value heads, value blocks[, chunks on TPU])."""
  grid, scratch, params = grid3, (), None
  if cfg.tpu:
    grid = grid3 + (cfg.n_chunks,)
    scratch = (pltpu.VMEM(carry_shape, _F32),)
  if cfg.platform == "gpu":
    big = cfg.chunk * max(carry_shape) > 64 * 64  # [C, dk] or [C, block_v] blocks past 64 x 64
    params = pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=2)
  elif cfg.platform == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",))
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch, compiler_params=params,
      interpret=cfg.interpret, name=name)


def _forward(cfg: _Config, q, k, v, g, beta, nres, s0):
  batch, hv, n, c, dvp = v.shape
  dkp = q.shape[-1]
  sp = _input_specs(cfg, c, dkp, reverse=False)
  out_shape = (jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct(s0.shape, _F32),
               jax.ShapeDtypeStruct((batch, hv, n, dkp, dvp), _F32))
  out_specs = (sp["v"], sp["state"], sp["states"])
  in_specs = (sp["qk"], sp["qk"], sp["v"], sp["row"], sp["row"], sp["nres"], sp["state"])
  call = _call(cfg, _forward_kernel, "gated_delta_forward", in_specs, out_specs, out_shape,
               (batch, hv, dvp // cfg.block_v), (dkp, cfg.block_v))
  return call(q, k, v, g, beta, nres, s0)


def _backward(cfg: _Config, res, cts):
  q, k, v, g, beta, nres, states = res
  do, dfinal = cts
  batch, hv, n, c, dvp = v.shape
  hk, dkp = q.shape[1], q.shape[-1]
  nv = dvp // cfg.block_v
  sp = _input_specs(cfg, c, dkp, reverse=True)
  per_block = lambda b, h, j: (b, h, j)  # q/k/g/beta gradients: one partial per value block
  dqk_spec = _spec(cfg, (c, dkp), per_block, reverse=True)
  drow_spec = _spec(cfg, (1, c), per_block, reverse=True)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
  out_shape = (f32(batch, hv, nv, n, c, dkp), f32(batch, hv, nv, n, c, dkp), f32(*v.shape),
               f32(batch, hv, nv, n, 1, c), f32(batch, hv, nv, n, 1, c), f32(*dfinal.shape))
  out_specs = (dqk_spec, dqk_spec, sp["v"], drow_spec, drow_spec, sp["state"])
  in_specs = (sp["qk"], sp["qk"], sp["v"], sp["row"], sp["row"], sp["nres"], sp["states"],
              sp["v"], sp["state"])
  call = _call(cfg, _backward_kernel, "gated_delta_backward", in_specs, out_specs, out_shape,
               (batch, hv, nv), (dkp, cfg.block_v))
  dq, dk, dv, dg, db, ds0 = call(q, k, v, g, beta, nres, states, do, dfinal)
  # Sum the partials over value blocks, then over the value heads sharing a q/k head (float32).
  group_sum = lambda a: a.sum(2).reshape((batch, hk, cfg.group) + a.shape[3:]).sum(2)
  dq, dk = group_sum(dq).astype(q.dtype), group_sum(dk).astype(k.dtype)
  return dq, dk, dv.astype(v.dtype), dg.sum(2), db.sum(2), None, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Config, q, k, v, g, beta, nres, s0):
  """Kernel layout: q, k [B, Hk, n, C, dkp]; v [B, Hv, n, C, dvp]; g, beta [B, Hv, n, 1, C]
  float32; nres [B, n, 1, C] float32 (resets so far in the chunk); s0 [B, Hv, dkp, dvp] float32.
  Returns (out [B, Hv, n, C, dvp] in v's dtype, final state)."""
  out, final, _ = _forward(cfg, q, k, v, g, beta, nres, s0)
  return out, final


def _core_fwd(cfg, q, k, v, g, beta, nres, s0):
  out, final, states = _forward(cfg, q, k, v, g, beta, nres, s0)
  return (out, final), (q, k, v, g, beta, nres, states)


_core.defvjp(_core_fwd, _backward)


def gated_delta_rule_pallas(q, k, v, g, beta, *, scale: float | None = None,
                            initial_state=None, segment_ids=None, chunk_size: int = 64,
                            interpret=None, platform: str | None = None,
                            block_v: int | None = None) -> tuple[Array, Array]:
  """`gated_delta_rule` by the Pallas kernels (same arguments and outputs as
  `gated_delta_rule_chunked`; shapes in `layers.gated_delta.gated_delta_rule`).

  chunk_size: the kernel's chunk (a power of 2 in [16, 128]; shorter sequences use the next
    power of 2 >= max(length, 16); on GPU at most 64 and 4096 / dim_k padded, 8192 / dim_k
    for bf16 q, k, v: the most a Triton program's registers and shared memory hold).
  interpret: run the kernels in the Pallas interpreter (default: off GPU/TPU); True or a
    `pltpu.InterpretParams` (the TPU interpreter, which also checks block bounds).
  platform: "gpu" | "tpu" | "cpu" (default: the default backend): picks the driver (TPU: chunks
    on the grid) and the compiler parameters.
  block_v: columns of the state per program (a power of 2 >= 16 dividing dim_v padded to a power
    of 2; default 64 on GPU, 128 or all on TPU).
  Raises ValueError where `supports` gives a reason.
  """
  q, k, v, g, beta, s0, segment_ids = _check(q, k, v, g, beta, initial_state, segment_ids)
  reason = supports(q, k, v, g, beta, s0, segment_ids, chunk_size=chunk_size)
  if reason is not None:
    raise ValueError(f"gated_delta_rule_pallas: unsupported call: {reason}")
  interpret = dispatch.interpret_mode() if interpret is None else interpret
  platform = dispatch.platform() if platform is None else platform
  batch, length, hk, dk = q.shape
  hv, dv = v.shape[2:]
  dkp, dvp = _pow2(max(dk, 16)), _pow2(max(dv, 16))
  if block_v is None:
    block_v = (128 if dvp % 128 == 0 else dvp) if platform == "tpu" else min(dvp, 64)
  if block_v < 16 or block_v & (block_v - 1) or dvp % block_v:
    raise ValueError(f"gated_delta_rule_pallas: block_v must be a power of 2 >= 16 dividing "
                     f"{dvp} (dim_v padded), got {block_v}")
  c = min(int(chunk_size), _pow2(max(length, 16)))
  bf16 = all(jnp.dtype(a.dtype) == jnp.dtype(jnp.bfloat16) for a in (q, k, v))
  if platform != "tpu":  # the GPU driver (on CPU: interpreted, with the GPU's limits)
    c = min(c, 64, max(16, (_GPU_CHUNK_BY_DIM_K_BF16 if bf16 else _GPU_CHUNK_BY_DIM_K) // dkp))
  n = -(-length // c)
  pad = n * c - length
  scale = dk ** -0.5 if scale is None else float(scale)
  cfg = _Config(scale, c, n, block_v, hv // hk, platform == "tpu", interpret, platform, bf16)

  def blocks(a, width):  # [B, L, H, d] -> [B, H, n, C, width]
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, width - a.shape[-1])))
    return jnp.moveaxis(a, 2, 1).reshape(batch, a.shape[2], n, c, width)

  def rows(a):  # [B, L, H] -> [B, H, n, 1, C] float32
    a = jnp.pad(a.astype(_F32), ((0, 0), (0, pad), (0, 0)))
    return jnp.moveaxis(a, 2, 1).reshape(batch, hv, n, 1, c)

  resets = jnp.pad(_resets(segment_ids, batch, length).astype(jnp.int32), ((0, 0), (0, pad)))
  nres = jnp.cumsum(resets.reshape(batch, n, 1, c), axis=-1).astype(_F32)
  if s0 is None:
    s0 = jnp.zeros((batch, hv, dkp, dvp), _F32)
  else:
    s0 = jnp.pad(s0.astype(_F32), ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))
  out, final = _core(cfg, blocks(q, dkp), blocks(k, dkp), blocks(v, dvp), rows(g), rows(beta),
                     nres, s0)
  out = jnp.moveaxis(out.reshape(batch, hv, n * c, dvp), 1, 2)[:, :length, :, :dv]
  return out, final[:, :, :dk, :dv]
