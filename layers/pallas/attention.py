"""Pallas flash-attention kernel for sliding-window attention (`layers.attention`, impl="pallas").

Computes `prefix_window_attention` (and `window_attention` through it): for query i, sitting at
key index P + i (P = q_offset), and key j (head h reads kv head h // R, R = heads / kv_heads):

    s_ij  = scale <q_i, k_j>,  s_ij = cap tanh(s_ij / cap) with a soft-cap
    out_i = sum_{j in V(i)} exp(s_ij - lse_i) v_j,   lse_i = log sum_{j in V(i)} exp(s_ij)

    V(i) = {j : q_docs[i] == kv_docs[j] >= 0,  0 <= P + i - j < w (causal) or |P + i - j| < w}

(w = inf for global attention; bidirectional windows are supported). A query with no visible key
outputs 0.

Forward (flash-attention 2): queries in blocks of Bq, keys in blocks of Bk. The program of query
block c holds its [Bq, D] queries and the float32 online-softmax statistics m (running max), l
(running sum) and acc [Bq, Dv], and visits only the key blocks that can intersect the windows of
its queries: key indices [P + c Bq - (w - 1), P + (c + 1) Bq - 1] (+ w - 1 if bidirectional),
clipped to the keys; a block outside every window is never loaded. Per visited key block:

    m' = max(m, rowmax(s)),  p = exp(s - m') (0 where masked),  l' = e^{m - m'} l + rowsum(p),
    acc' = e^{m - m'} acc + p v;       at the end: out = acc / l, lse = m + log l.

Masking inside a visited block (the causal diagonal, the window edge, documents, padding) is an
elementwise `where` on the block's key-index difference and document numbers. Masked logits
are replaced by -1e30 (not -inf), so an all-masked block leaves m, l, acc unchanged with no
inf - inf.

Backward (`jax.custom_vjp`, flash-attention 2): the forward saves only out and lse (one float32 per
query row). With delta_i = do_i . out_i (in the wrapper) and P = exp(s - lse) recomputed per block:

    dv_j = sum_i P_ij do_i,   ds_ij = P_ij (do_i . v_j - delta_i) (1 - tanh^2 with a cap),
    dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i

in two kernels: dq, one program per query block visiting the same key blocks as the forward; dk
and dv, one program per (kv head, key block) visiting, for each of the R query heads that share the
kv head, the query blocks whose windows can reach the key block (query indices [j - P - (w - 1),
j - P + w - 1] around the block's keys j; causal: from j - P on), so GQA sums over the group inside
the kernel and a key outside every window gets exactly zero gradient.

GQA: the query-head program reads kv head h // R through the index map (no repeat in memory).
Matmuls take the input dtype (bf16 on the tensor cores / MXU; float32 at float32 accuracy: three
TF32 passes for the GPU driver, HIGHEST for the TPU one, `layers.pallas.precision`) and
accumulate in float32; p and ds are cast to the input dtype for their matmuls, as flash attention
does. Statistics, softmax and accumulators are float32. On GPU, float32 inputs get smaller
default blocks (32 at head dim 128) so the backward fits an H100's shared memory.

Layout and padding (in the wrapper): lengths are padded to multiples of the blocks (padded queries
and keys get document -1: they see and are seen by nothing) and head dims to powers of 2 >= 16
(zero columns change no dot product). Arrays are laid out [batch, heads, blocks, block, dim], so
every block's last two dims equal the array's (TPU tiling holds for any block size) and every
tensor a kernel touches has power-of-2 dims (Triton).

Two drivers of the same block step, as for the other kernels of `layers.pallas`:
  GPU (and interpret mode on CPU): grid (batch, heads, blocks). A program holds its head's whole
    key (or query) sequence as [n, B, d] blocks and walks the in-window ones in a `fori_loop` with
    bounds computed from its block index, so only those are ever read. This is the Triton lowering
    (`jax.experimental.pallas.triton`): its blocks are pointers, so the sequence length costs no
    on-chip memory, a data-dependent loop over key blocks with two matmuls each is what Triton
    compiles well, and it runs on A100 and H100 alike (no Hopper-only features).
  TPU (Mosaic): the visited blocks are two more grid axes (heads of the group, blocks), both
    "arbitrary"; their block index is computed in the index map (the first in-window block plus
    the step, clamped to the last, so steps past the window re-use the resident block: no DMA and
    no compute), and m, l, acc live in VMEM scratch across those steps. The number of steps is the
    most in-window blocks of any program (about (w + Bq) / Bk), not the number of key blocks.

Decode (one query against the ring-buffer cache) is not sent here by impl="auto"
(`prefix_window_attention` keeps queries that fit one block on the dense XLA form): a single query
row gains nothing from a flash kernel's tiling (it is one matrix-vector product per head over the
window), and padding it to a block of queries would waste the tile.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from layers import attention as attention_lib
from layers.pallas import dispatch
from layers.pallas import precision

Array = jax.Array

_F32 = jnp.float32
_NEG = -1e30  # a masked logit: exp(_NEG - m) = 0, and no inf - inf when a row has no key yet
_MAX_HEAD_DIM = 256  # a program holds [B, head_dim] blocks in registers / VMEM
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_BLOCKS = {"gpu": (64, 64), "tpu": (128, 128)}  # default (block_q, block_k); others as GPU
# GPU, float32 inputs: default blocks of 4096 / head_dim padded (32 at 128). Compiled for sm_90 at
# head dim 128, 64 x 64 float32 blocks need up to 289 KiB of shared memory (an H100 has 227 KiB),
# 32 x 32 blocks 96 KiB; bf16 blocks of 64 need 105 KiB (201 KiB at head dim 256).
_GPU_F32_BLOCK_BY_DIM = 32 * 128


def _pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def supports(q: Array, k: Array, v: Array, q_docs: Array | None = None,
             kv_docs: Array | None = None, *, window: int | None = None, causal: bool = True,
             softcap: float | None = None, scale: float | None = None,
             q_offset: int | None = None) -> str | None:
  """None if the kernel handles this (validated) call, else the reason. Every window (causal or
  bidirectional, or global), document numbering, soft-cap, scale and q_offset is handled."""
  del q_docs, kv_docs, window, causal, softcap, scale, q_offset
  for name, a in (("q", q), ("k", k), ("v", v)):
    if jnp.dtype(a.dtype) not in _DTYPES:
      return f"{name} has dtype {jnp.dtype(a.dtype).name} (the kernel takes float32 and bfloat16)"
  if len({jnp.dtype(a.dtype) for a in (q, k, v)}) > 1:
    return (f"q, k, v have dtypes {jnp.dtype(q.dtype).name}, {jnp.dtype(k.dtype).name}, "
            f"{jnp.dtype(v.dtype).name} (the kernel takes one dtype for all three)")
  if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
    return (f"head_dim {q.shape[-1]} / v_dim {v.shape[-1]} > {_MAX_HEAD_DIM} (the kernel's "
            "per-program blocks)")
  return None


class _Config(NamedTuple):
  window: int | None
  causal: bool
  softcap: float | None
  scale: float
  q_offset: int  # P: the key index of query 0
  lq: int  # real (unpadded) lengths
  lk: int
  bq: int  # query and key blocks
  bk: int
  group: int  # R: query heads per kv head
  tpu: bool  # visited blocks on the grid, statistics in VMEM scratch
  interpret: Any  # bool or pltpu.InterpretParams
  platform: str

  @property
  def nq(self) -> int:
    return -(-self.lq // self.bq)

  @property
  def nk(self) -> int:
    return -(-self.lk // self.bk)


# ------------------------------------------------------------------ which blocks are in a window


class _Ops(NamedTuple):
  max: Callable[[Any, Any], Any]
  min: Callable[[Any, Any], Any]
  div: Callable[[Any, Any], Any]  # of non-negative ints


_NP = _Ops(np.maximum, np.minimum, np.floor_divide)  # static: over all blocks at once
_LAX = _Ops(lax.max, lax.min, lax.div)  # in kernels and index maps (no sign ops there)


def _key_blocks(cfg: _Config, c, ops: _Ops = _LAX):
  """(first, count): the key blocks that query block c can see (count >= 1)."""
  first = cfg.q_offset + c * cfg.bq
  last = ops.min(first + (cfg.bq - 1), cfg.q_offset + cfg.lq - 1)
  reach = None if cfg.window is None else cfg.window - 1
  lo = ops.div(ops.max(first - reach, 0), cfg.bk) if reach is not None else 0 * c
  if cfg.causal:
    hi = last
  elif reach is None:
    hi = cfg.lk - 1 + 0 * c
  else:
    hi = ops.min(last + reach, cfg.lk - 1)
  return lo, ops.div(hi, cfg.bk) - lo + 1


def _query_blocks(cfg: _Config, kb, ops: _Ops = _LAX):
  """(first, count): the query blocks whose windows reach key block kb (count may be 0)."""
  first = kb * cfg.bk
  last = ops.min(first + (cfg.bk - 1), cfg.lk - 1)
  reach = None if cfg.window is None else cfg.window - 1
  if cfg.causal:
    lo = first - cfg.q_offset
  elif reach is None:
    lo = 0 * kb
  else:
    lo = first - cfg.q_offset - reach
  hi = cfg.lq - 1 + 0 * kb if reach is None else last - cfg.q_offset + reach
  lo, hi = ops.max(lo, 0), ops.max(ops.min(hi, cfg.lq - 1), -1)  # query indices lo .. hi
  some = ops.min(ops.max(hi - lo + 1, 0), 1)  # 0 if no query: lo > hi
  lo_block = ops.div(lo, cfg.bq)
  return lo_block, some * ops.max(ops.div(hi + cfg.bq, cfg.bq) - lo_block, 0)


def _most_visits(cfg: _Config) -> tuple[int, int]:
  """The most key blocks any query block visits, and query blocks any key block visits."""
  _, n_keys = _key_blocks(cfg, np.arange(cfg.nq), _NP)
  _, n_queries = _query_blocks(cfg, np.arange(cfg.nk), _NP)
  return max(1, int(np.max(n_keys))), max(1, int(np.max(n_queries)))


# ------------------------------------------------------------------------------ the block math


def _dot(cfg: _Config, a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """a @ b contracting dims `contract`, accumulated in float32: bf16 operands as they are,
  float32 ones at float32 accuracy (`layers.pallas.precision`)."""
  return precision.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               platform=cfg.platform, interpret=cfg.interpret,
                               bf16_operands=a.dtype != _F32)


def _scores(cfg: _Config, q: Array, k: Array, qdoc: Array, kdoc: Array, c, kb):
  """Logits s [Bq, Bk] (scaled, capped), tanh(s / cap) (None without a cap) and the visibility
  mask of query block c against key block kb; qdoc [Bq, 1], kdoc [1, Bk]."""
  s = _dot(cfg, q, k, (1, 1)) * cfg.scale
  t = None
  if cfg.softcap is not None:
    t = jnp.tanh(s * (1.0 / cfg.softcap))
    s = cfg.softcap * t
  shape = (cfg.bq, cfg.bk)
  d = ((cfg.q_offset + c * cfg.bq - kb * cfg.bk) + lax.broadcasted_iota(jnp.int32, shape, 0)
       - lax.broadcasted_iota(jnp.int32, shape, 1))  # key index of the query - that of the key
  mask = (qdoc == kdoc) & (kdoc >= 0)
  if cfg.causal:
    mask &= d >= 0
  if cfg.window is not None:
    mask &= d < cfg.window
    if not cfg.causal:
      mask &= d > -cfg.window
  return s, t, mask


def _probabilities(cfg, q, k, qdoc, kdoc, c, kb, lse):
  s, t, mask = _scores(cfg, q, k, qdoc, kdoc, c, kb)
  return jnp.exp(jnp.where(mask, s - lse, _NEG)), t


def _ds(p: Array, t: Array | None, dp: Array, delta: Array) -> Array:
  ds = p * (dp - delta)
  return ds if t is None else ds * (1.0 - t * t)


# ------------------------------------------------------------------------------ the kernels


class _Visit(NamedTuple):
  """One visited block: `at(ref)` is its view (GPU: ref holds [reps, n, ...] or, not per head,
  [n, ...]; TPU: the index map already selected it)."""
  r: Any  # the head within the group (dk/dv kernel), else 0
  blk: Any  # the block index
  tpu: bool

  def __call__(self, ref, per_head: bool = True):
    if self.tpu:
      return ref
    return ref.at[self.r, self.blk] if per_head else ref.at[self.blk]


def _visit(cfg: _Config, first, count, reps: int, most: int, step, finish, init, scratch):
  """carry = step(visit, carry) over blocks first .. first + count - 1, for each of `reps` heads,
  from `init`; then finish(carry). GPU/interpret: a fori_loop; TPU: grid axes 3 (reps) and 4
  (`most` steps, those >= count skipped), the carry in VMEM scratch."""
  if cfg.tpu:
    r, u = pl.program_id(3), pl.program_id(4)

    @pl.when((r == 0) & (u == 0))
    def _():
      for ref, x in zip(scratch, init):
        ref[...] = x

    @pl.when(u < count)
    def _():
      carry = step(_Visit(r, first + u, True), tuple(ref[...] for ref in scratch))
      for ref, x in zip(scratch, carry):
        ref[...] = x

    @pl.when((r == reps - 1) & (u == most - 1))
    def _():
      finish(tuple(ref[...] for ref in scratch))
  elif reps == 1:
    finish(lax.fori_loop(first, first + count,
                         lambda blk, carry: step(_Visit(0, blk, False), carry), init))
  else:
    def body(n, carry):
      return step(_Visit(lax.div(n, count), first + lax.rem(n, count), False), carry)

    finish(lax.fori_loop(0, reps * count, body, init))


def _forward_kernel(q_ref, k_ref, v_ref, qdoc_ref, kdoc_ref, o_ref, lse_ref, *scratch,
                    cfg: _Config, most: int):
  c = pl.program_id(2)
  q, qdoc = q_ref[...], qdoc_ref[...]

  def step(at, carry):
    m, l, acc = carry
    s, _, mask = _scores(cfg, q, at(k_ref)[...], qdoc, at(kdoc_ref, False)[...], c, at.blk)
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    v = at(v_ref)[...]
    return (m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True),
            alpha * acc + _dot(cfg, p.astype(v.dtype), v, (1, 0)))

  def finish(carry):
    m, l, acc = carry
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l), 0.0)  # a row without keys: P = 0 anyway

  init = (jnp.full((cfg.bq, 1), _NEG, _F32), jnp.zeros((cfg.bq, 1), _F32),
          jnp.zeros(o_ref.shape, _F32))
  first, count = _key_blocks(cfg, c)
  _visit(cfg, first, count, 1, most, step, finish, init, scratch)


def _dq_kernel(q_ref, k_ref, v_ref, qdoc_ref, kdoc_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *scratch, cfg: _Config, most: int):
  c = pl.program_id(2)
  q, qdoc, do = q_ref[...], qdoc_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def step(at, carry):
    k = at(k_ref)[...]
    p, t = _probabilities(cfg, q, k, qdoc, at(kdoc_ref, False)[...], c, at.blk, lse)
    ds = _ds(p, t, _dot(cfg, do, at(v_ref)[...], (1, 1)), delta)
    return (carry[0] + _dot(cfg, ds.astype(k.dtype), k, (1, 0)),)

  def finish(carry):
    dq_ref[...] = (cfg.scale * carry[0]).astype(dq_ref.dtype)

  first, count = _key_blocks(cfg, c)
  _visit(cfg, first, count, 1, most, step, finish, (jnp.zeros(q.shape, _F32),), scratch)


def _dkdv_kernel(q_ref, k_ref, v_ref, qdoc_ref, kdoc_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *scratch, cfg: _Config, most: int):
  kb = pl.program_id(2)
  k, v, kdoc = k_ref[...], v_ref[...], kdoc_ref[...]

  def step(at, carry):
    dk, dv = carry
    q, do = at(q_ref)[...], at(do_ref)[...]
    p, t = _probabilities(cfg, q, k, at(qdoc_ref, False)[...], kdoc, at.blk, kb,
                          at(lse_ref)[...])
    dv = dv + _dot(cfg, p.astype(do.dtype), do, (0, 0))  # P^T dO
    ds = _ds(p, t, _dot(cfg, do, v, (1, 1)), at(delta_ref)[...])
    return dk + _dot(cfg, ds.astype(q.dtype), q, (0, 0)), dv  # dS^T Q

  def finish(carry):
    dk_ref[...] = (cfg.scale * carry[0]).astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)

  first, count = _query_blocks(cfg, kb)
  init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
  _visit(cfg, first, count, cfg.group, most, step, finish, init, scratch)


# ------------------------------------------------------------------------------ specs and calls


def _home(tail: tuple[int, ...], per_head: bool = True) -> pl.BlockSpec:
  """The program's own block of a [batch, heads, n, *tail] (or [batch, n, *tail]) array; the
  program is (b, h, i[, r, u])."""
  zeros = (0,) * len(tail)
  if per_head:
    return pl.BlockSpec((None, None, None) + tail, lambda b, h, i, *_: (b, h, i) + zeros)
  return pl.BlockSpec((None, None) + tail, lambda b, h, i, *_: (b, i) + zeros)


def _visited(cfg: _Config, tail: tuple[int, ...], n: int, blocks, *, per_head: bool = True,
             tpu_head=None, gpu_heads=None) -> pl.BlockSpec:
  """Blocks a program visits of a [batch, heads, n, *tail] (or [batch, n, *tail]) array.
  blocks(cfg, i) -> (first, count) for program block i; TPU: tpu_head(h, r) is the head of step
  r; GPU: gpu_heads = (size, index(h)), the block of heads the program holds whole."""
  zeros = (0,) * len(tail)
  if cfg.tpu:
    def index(b, h, i, r, u):
      first, count = blocks(cfg, i)
      blk = lax.max(lax.min(first + lax.min(u, count - 1), n - 1), 0)
      return ((b, tpu_head(h, r), blk) if per_head else (b, blk)) + zeros

    return pl.BlockSpec((None,) * (3 if per_head else 2) + tail, index)
  if per_head:
    size, head_block = gpu_heads
    return pl.BlockSpec((None, size, n) + tail, lambda b, h, i: (b, head_block(h), 0) + zeros)
  return pl.BlockSpec((None, n) + tail, lambda b, h, i: (b, 0) + zeros)


def _call(cfg: _Config, kernel, name: str, grid: tuple[int, ...], reps: int, most: int,
          in_specs, out_specs, out_shape, scratch_shapes):
  scratch, params = (), None
  if cfg.tpu:
    grid = grid + (reps, most)
    scratch = tuple(pltpu.VMEM(s, _F32) for s in scratch_shapes)
  if cfg.platform == "gpu":
    big = max(s[-1] for s in scratch_shapes) > 64
    params = pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=2)
  elif cfg.platform == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",) * 2)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg, most=most), out_shape=out_shape, grid=grid,
      in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch, compiler_params=params,
      interpret=cfg.interpret, name=name)


def _kv_specs(cfg: _Config, dp: int, dvp: int):
  """Specs of k, v, kv docs as visited by a query-block program (forward, dq)."""
  group = cfg.group
  kv = lambda d: _visited(cfg, (cfg.bk, d), cfg.nk, _key_blocks,
                          tpu_head=lambda h, r: lax.div(h, group),
                          gpu_heads=(1, lambda h: lax.div(h, group)))
  return kv(dp), kv(dvp), _visited(cfg, (1, cfg.bk), cfg.nk, _key_blocks, per_head=False)


def _forward(cfg: _Config, q, k, v, qdoc, kdoc):
  batch, heads, nq, bq, dp = q.shape
  dvp = v.shape[-1]
  most, _ = _most_visits(cfg)
  k_spec, v_spec, kdoc_spec = _kv_specs(cfg, dp, dvp)
  in_specs = (_home((bq, dp)), k_spec, v_spec, _home((bq, 1), per_head=False), kdoc_spec)
  out_shape = (jax.ShapeDtypeStruct((batch, heads, nq, bq, dvp), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, nq, bq, 1), _F32))
  call = _call(cfg, _forward_kernel, "window_attention_forward", (batch, heads, nq), 1, most,
               in_specs, (_home((bq, dvp)), _home((bq, 1))), out_shape,
               ((bq, 1), (bq, 1), (bq, dvp)))
  return call(q, k, v, qdoc, kdoc)


def _backward(cfg: _Config, res, do):
  q, k, v, qdoc, kdoc, out, lse = res
  batch, heads, nq, bq, dp = q.shape
  kv_heads, nk, bk, dvp = v.shape[1:]
  delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
  most_k, most_q = _most_visits(cfg)
  args = (q, k, v, qdoc, kdoc, do, lse, delta)

  # dq: one program per query block, visiting its key blocks (as the forward).
  k_spec, v_spec, kdoc_spec = _kv_specs(cfg, dp, dvp)
  home_row = _home((bq, 1))
  in_specs = (_home((bq, dp)), k_spec, v_spec, _home((bq, 1), per_head=False), kdoc_spec,
              _home((bq, dvp)), home_row, home_row)
  dq = _call(cfg, _dq_kernel, "window_attention_dq", (batch, heads, nq), 1, most_k, in_specs,
             _home((bq, dp)), jax.ShapeDtypeStruct(q.shape, q.dtype), ((bq, dp),))(*args)

  # dk, dv: one program per (kv head, key block), visiting the query blocks of its R heads.
  group = cfg.group
  qs = lambda d: _visited(cfg, (bq, d), nq, _query_blocks,
                          tpu_head=lambda g, r: g * group + r, gpu_heads=(group, lambda g: g))
  in_specs = (qs(dp), _home((bk, dp)), _home((bk, dvp)),
              _visited(cfg, (bq, 1), nq, _query_blocks, per_head=False),
              _home((1, bk), per_head=False), qs(dvp), qs(1), qs(1))
  out_shape = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  dk, dv = _call(cfg, _dkdv_kernel, "window_attention_dkdv", (batch, kv_heads, nk), group,
                 most_q, in_specs, (_home((bk, dp)), _home((bk, dvp))), out_shape,
                 ((bk, dp), (bk, dvp)))(*args)
  return dq, dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Config, q, k, v, qdoc, kdoc):
  """Kernel layout: q [B, H, nq, Bq, Dp], k [B, KVH, nk, Bk, Dp], v [B, KVH, nk, Bk, Dvp];
  qdoc [B, nq, Bq, 1], kdoc [B, nk, 1, Bk] int32. Returns out [B, H, nq, Bq, Dvp]."""
  return _forward(cfg, q, k, v, qdoc, kdoc)[0]


def _core_fwd(cfg: _Config, q, k, v, qdoc, kdoc):
  out, lse = _forward(cfg, q, k, v, qdoc, kdoc)
  return out, (q, k, v, qdoc, kdoc, out, lse)


_core.defvjp(_core_fwd, _backward)


def prefix_window_attention_pallas(q, k, v, *, q_docs, kv_docs, window: int | None = None,
                                   causal: bool = True, softcap: float | None = None,
                                   scale: float | None = None, q_offset: int | None = None,
                                   interpret=None, platform: str | None = None,
                                   block_q: int | None = None,
                                   block_k: int | None = None) -> Array:
  """`prefix_window_attention` by the Pallas kernels (same arguments, shapes and output; see
  `layers.attention.prefix_window_attention`; the xla form's block_size does not apply).

  interpret: run the kernels in the Pallas interpreter (default: off GPU/TPU); True or a
    `pltpu.InterpretParams` (the TPU interpreter, which also checks block bounds).
  platform: "gpu" | "tpu" | "cpu" (default: the default backend): picks the driver (TPU: visited
    blocks on the grid), the compiler parameters and the default blocks.
  block_q, block_k: query and key blocks (powers of 2 >= 16; default 64 on GPU, 128 on TPU, and
    on GPU for float32 inputs 4096 / head_dim padded, in [16, 64]; shorter sequences use the next
    power of 2 >= max(length, 16)).
  Raises ValueError where `supports` gives a reason.
  """
  name = "prefix_window_attention_pallas"
  q, k, v, q_docs, kv_docs, scale = attention_lib._check(q, k, v, q_docs, kv_docs, window,
                                                         softcap, scale, 1, name)
  batch, lq, heads, d = q.shape
  lk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  q_offset = lk - lq if q_offset is None else q_offset
  if not isinstance(q_offset, (int, np.integer)) or not 0 <= q_offset <= lk - lq:
    raise ValueError(f"{name}: q_offset must be a static int in [0, Lk - Lq] = [0, {lk - lq}], "
                     f"got {q_offset!r}")
  reason = supports(q, k, v, q_docs, kv_docs)
  if reason is not None:
    raise ValueError(f"{name}: unsupported call: {reason}")
  interpret = dispatch.interpret_mode() if interpret is None else interpret
  platform = dispatch.platform() if platform is None else platform
  dp, dvp = _pow2(max(d, 16)), _pow2(max(dv, 16))
  default_q, default_k = _BLOCKS.get(platform, _BLOCKS["gpu"])
  if platform != "tpu" and q.dtype == _F32:  # the GPU driver, compiled or interpreted
    default_q = default_k = min(64, max(16, _GPU_F32_BLOCK_BY_DIM // max(dp, dvp)))
  blocks = {"block_q": default_q if block_q is None else block_q,
            "block_k": default_k if block_k is None else block_k}
  for key, b in blocks.items():
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 16 or b & (b - 1):
      raise ValueError(f"{name}: {key} must be a power of 2 >= 16, got {b!r}")
  bq = min(int(blocks["block_q"]), _pow2(max(lq, 16)))
  bk = min(int(blocks["block_k"]), _pow2(max(lk, 16)))
  cfg = _Config(None if window is None else int(window), bool(causal),
                None if softcap is None else float(softcap), scale, int(q_offset), lq, lk, bq,
                bk, heads // kv_heads, platform == "tpu", interpret, platform)

  def blocked(a, n, size, width):  # [B, L, heads, dim] -> [B, heads, n, size, width]
    a = jnp.pad(a, ((0, 0), (0, n * size - a.shape[1]), (0, 0), (0, width - a.shape[-1])))
    return jnp.moveaxis(a, 2, 1).reshape(batch, a.shape[2], n, size, width)

  def docs(a, n, size):  # [B, L] -> [B, n * size] with document -1 in the padding
    return jnp.pad(a, ((0, 0), (0, n * size - a.shape[1])), constant_values=-1)

  out = _core(cfg, blocked(q, cfg.nq, bq, dp), blocked(k, cfg.nk, bk, dp),
              blocked(v, cfg.nk, bk, dvp), docs(q_docs, cfg.nq, bq).reshape(batch, cfg.nq, bq, 1),
              docs(kv_docs, cfg.nk, bk).reshape(batch, cfg.nk, 1, bk))
  out = jnp.moveaxis(out.reshape(batch, heads, cfg.nq * bq, dvp), 1, 2)
  return out[:, :lq, :, :dv]
