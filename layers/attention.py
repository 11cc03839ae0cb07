"""Sliding-window and global softmax attention (GQA, RoPE, QK-norm, soft-cap) with a ring-buffer
KV cache.

For query i and key j (head h reads kv head h // (H / KVH): grouped-query attention, multi-query
when KVH = 1):

    s_ij  = scale <q_i, k_j>                          scale = head_dim^-1/2 unless given
    s_ij  = softcap tanh(s_ij / softcap)              optional logit soft-cap (Gemma 2)
    out_i = sum_{j in V(i)} exp(s_ij) v_j / sum_{j in V(i)} exp(s_ij)      in float32

The visible set V(i), with a window of w tokens (the query itself included):
    causal=True:   i - w < j <= i        (window=None: j <= i)
    causal=False:  |i - j| < w           (window=None: all j)
and j in i's document. A query with no visible key outputs 0, never NaN.

Documents. `window_attention` takes `segment_ids` [batch, length]: a change of id between two
neighbouring tokens starts a new document (ids are compared as runs, so ids [0, 1, 0] are three
documents, as for every other mixer). `prefix_window_attention` is the general form the KV cache
uses: keys [batch, Lk] of which the queries are the last Lq (query i sits at key index
Lk - Lq + i; the first Lk - Lq keys are a cached prefix), or any Lq consecutive ones (query i at
key index q_offset + i: a shard of the sequence between the keys before and after it), and
explicit document numbers per query and per key compared for equality; a key whose number is
negative is never visible.

Implementations (`impl=`):
  reference  dense scores [batch, heads, Lq, Lk] under the mask: the spec, O(Lq Lk) memory.
  xla        blocked, flash-style: queries in blocks of B = block_size tokens; for each query
             block only the contiguous key span that can intersect its window (w - 1 + B keys,
             causal), visited as bands of B keys with an online softmax in float32. Band m pairs
             every query block c with the key span starting at (c + m) B, so a band is one static
             reshape of a shifted key array and all query blocks run in parallel; FLOPs and
             memory grow as L * w. The backward is a `custom_vjp` that recomputes each band's
             scores from the saved log-sum-exp (flash-attention 2), so training memory is O(L)
             besides one band's [L, B] scores. Global attention (or a window spanning every key
             block) visits every (query block, key block) pair once, masking the causal half.
  pallas     the flash-attention kernels of `layers.pallas.attention` (forward and backward;
             Triton on GPU, Mosaic on TPU, interpret mode on CPU): the xla form's visiting of
             in-window key blocks only, with the blocks in on-chip memory. Under a mesh it runs
             inside shard_map over batch and heads (`layers.pallas.dispatch.on_mesh`).
  auto       when all queries fit in one block (Lq <= block_size, e.g. decoding one token from a
             cache) the dense form, which does the same work without padding the queries to a
             block: decode stays off the kernel, since a single query row gains nothing from a
             flash kernel's tiling. Otherwise pallas on GPU/TPU where the kernel's `supports`
             holds, else xla (`layers.pallas.dispatch.resolve`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers import sequence_parallel as sp
from layers.blocks import RMSNorm, apply_rope
from layers.pallas import dispatch

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

IMPLEMENTATIONS = ("reference", "xla", "pallas")


class _Config(NamedTuple):
  window: int | None
  causal: bool
  softcap: float | None
  scale: float
  block_size: int
  q_offset: int  # the key index of query 0


def _compute_dtype(*arrays: Array) -> jnp.dtype:
  # float32 at least (bf16 inputs accumulate in float32); float64 inputs stay float64.
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _visible(qpos: Array, kpos: Array, qdoc: Array, kdoc: Array, window: int | None,
             causal: bool) -> Array:
  """bool [..., Q, K]: key kpos[k] is visible from query qpos[q] (key indices; docs alike)."""
  d = qpos[..., :, None] - kpos[..., None, :]
  ok = (qdoc[..., :, None] == kdoc[..., None, :]) & (kdoc >= 0)[..., None, :]
  if causal:
    ok &= d >= 0
  if window is not None:
    ok &= (d < window) if causal else (jnp.abs(d) < window)
  return ok


def _logits(q: Array, k: Array, cfg: _Config, spec: str) -> tuple[Array, Array | None]:
  """scale q.k, soft-capped; also tanh(s / softcap) (None without a cap) for the backward."""
  s = jnp.einsum(spec, q, k) * cfg.scale
  if cfg.softcap is None:
    return s, None
  t = jnp.tanh(s / cfg.softcap)
  return cfg.softcap * t, t


# --------------------------------------------------------------------------------------------
# reference: dense masked scores


def _reference(q, k, v, q_docs, kv_docs, cfg: _Config) -> Array:
  batch, lq, heads, _ = q.shape
  lk, kv_heads = k.shape[1], k.shape[2]
  dtype = _compute_dtype(q, k, v)
  qg = q.astype(dtype).reshape(batch, lq, kv_heads, heads // kv_heads, q.shape[-1])
  s, _ = _logits(qg, k.astype(dtype), cfg, "bqgrd,bkgd->bgrqk")  # [b, G, R, Lq, Lk]
  mask = _visible(cfg.q_offset + jnp.arange(lq), jnp.arange(lk), q_docs, kv_docs, cfg.window,
                  cfg.causal)  # [b, Lq, Lk]
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  # Softmax is shift-invariant: the max only keeps exp in range and needs no gradient. A row with
  # no visible key has max -inf; shifting by 0 instead leaves exp(-inf) = 0 and a zero row.
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", p / jnp.where(denom > 0, denom, 1.0), v.astype(dtype))
  return out.reshape(batch, lq, heads, v.shape[-1]).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# xla: blocked, banded, online softmax, custom_vjp


class _Layout(NamedTuple):
  """The key "source" of the xla form: `copies` runs of the keys k[offset : offset + run] (zeros
  and document -1 outside [0, lk)); band m gives query block c the source entries
  [(c + m) B, (c + m + 1) B)."""
  n_q_blocks: int
  n_bands: int
  offset: int
  run: int
  copies: int

  def key_index(self) -> np.ndarray:
    """[copies * run]: the key index of each source entry."""
    return np.tile(np.arange(self.run) + self.offset, self.copies)


def _layout(lq: int, lk: int, cfg: _Config) -> _Layout:
  bs = cfg.block_size
  nbq, nbk = -(-lq // bs), -(-lk // bs)
  if cfg.window is not None:
    before = cfg.window - 1
    after = 0 if cfg.causal else cfg.window - 1
    n_bands = -(-(before + after + bs) // bs)
    if n_bands < nbk:
      # Query block c holds key indices P + cB + [0, B) (P = q_offset); its window reaches back
      # `before` keys and ahead `after` keys: a span starting at P - before + cB.
      return _Layout(nbq, n_bands, cfg.q_offset - before, (n_bands + nbq - 1) * bs, 1)
  # Every pair once: the key blocks twice in a row, so (c + m) mod nbk runs over all blocks.
  return _Layout(nbq, nbk, 0, nbk * bs, 2)


def _shift(x: Array, offset: int, n: int, fill: Any = 0) -> Array:
  """y[:, j] = x[:, j + offset] for 0 <= j < n, `fill` where j + offset falls outside x. Its
  adjoint is _shift(., -offset, x.shape[1])."""
  front, back = max(0, -offset), max(0, offset + n - x.shape[1])
  x = jnp.pad(x, [(0, 0), (front, back)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  return lax.slice_in_dim(x, offset + front, offset + front + n, axis=1)


def _band_setup(q, k, v, q_docs, kv_docs, cfg: _Config):
  """Blocked queries and the key sources, in the compute dtype."""
  batch, lq, heads, d = q.shape
  lk, kv_heads = k.shape[1], k.shape[2]
  bs = cfg.block_size
  lay = _layout(lq, lk, cfg)
  nbq = lay.n_q_blocks
  dtype = _compute_dtype(q, k, v)
  pad = nbq * bs - lq
  qb = jnp.pad(q.astype(dtype), [(0, 0), (0, pad), (0, 0), (0, 0)])
  qb = qb.reshape(batch, nbq, bs, kv_heads, heads // kv_heads, d)
  # Padded queries belong to no document: they see nothing and output 0.
  qdoc = jnp.pad(q_docs, [(0, 0), (0, pad)], constant_values=-1).reshape(batch, nbq, bs)
  qpos = jnp.asarray((cfg.q_offset + np.arange(nbq * bs)).reshape(nbq, bs))
  source = lambda x, fill=0: jnp.concatenate([_shift(x, lay.offset, lay.run, fill)] * lay.copies,
                                             axis=1)
  sources = (source(k.astype(dtype)), source(v.astype(dtype)), source(kv_docs, -1),
             jnp.asarray(lay.key_index()))
  return qb, qdoc, qpos, sources, lay


def _band(m, arrays, nbq: int, bs: int):
  """Band m of the sources, blocked as [batch, nbq, B, ...] (src index: [nbq, B])."""
  ksrc, vsrc, kdoc_src, src = arrays
  cut = lambda a, axis: lax.dynamic_slice_in_dim(a, m * bs, nbq * bs, axis)
  kb, vb = cut(ksrc, 1), cut(vsrc, 1)
  return (kb.reshape(kb.shape[0], nbq, bs, *kb.shape[2:]),
          vb.reshape(vb.shape[0], nbq, bs, *vb.shape[2:]),
          cut(kdoc_src, 1).reshape(-1, nbq, bs), cut(src, 0).reshape(nbq, bs))


_SCORES = "bcqgrd,bckgd->bcgrqk"  # [b, c, Q, G, R, D] x [b, c, K, G, D] -> [b, c, G, R, Q, K]


def _blocked_forward(q, k, v, q_docs, kv_docs, cfg: _Config):
  """(out [b, Lq, H, Dv] in the compute dtype, lse [b, nbq, G, R, B]; +inf on empty rows)."""
  batch, lq, heads, _ = q.shape
  kv_heads, dv = k.shape[2], v.shape[-1]
  bs = cfg.block_size
  qb, qdoc, qpos, sources, lay = _band_setup(q, k, v, q_docs, kv_docs, cfg)
  nbq = lay.n_q_blocks
  rows = (batch, nbq, kv_heads, heads // kv_heads, bs)

  def body(m, carry):
    mx, l, acc = carry
    kb, vb, kdoc, kpos = _band(m, sources, nbq, bs)
    s, _ = _logits(qb, kb, cfg, _SCORES)
    mask = _visible(qpos, kpos, qdoc, kdoc, cfg.window, cfg.causal)  # [b, c, Q, K]
    s = jnp.where(mask[:, :, None, None], s, -jnp.inf)
    mx_new = jnp.maximum(mx, jnp.max(s, axis=-1))
    shift = jnp.where(mx_new == -jnp.inf, 0.0, mx_new)  # all masked so far: exp(-inf) = 0
    alpha = jnp.exp(mx - shift)
    p = jnp.exp(s - shift[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("bcgrqk,bckgd->bcgrqd", p, vb)
    return mx_new, l, acc

  init = (jnp.full(rows, -jnp.inf, qb.dtype), jnp.zeros(rows, qb.dtype),
          jnp.zeros(rows + (dv,), qb.dtype))
  mx, l, acc = lax.fori_loop(0, lay.n_bands, body, init)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, mx + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
  out = jnp.moveaxis(out, 4, 2).reshape(batch, nbq * bs, heads, dv)[:, :lq]
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(q, k, v, q_docs, kv_docs, cfg: _Config) -> Array:
  return _blocked_forward(q, k, v, q_docs, kv_docs, cfg)[0].astype(q.dtype)


def _blocked_fwd(q, k, v, q_docs, kv_docs, cfg: _Config):
  out, lse = _blocked_forward(q, k, v, q_docs, kv_docs, cfg)
  return out.astype(q.dtype), (q, k, v, q_docs, kv_docs, out, lse)


def _blocked_bwd(cfg: _Config, res, dout):
  """Flash-attention 2 backward, band by band: with P = exp(s - lse) recomputed,
  dv_j = sum_i P_ij do_i,  ds_ij = P_ij (do_i . v_j - do_i . out_i),  dq_i = scale sum_j ds_ij
  k_j,  dk_j = scale sum_i ds_ij q_i  (ds times 1 - tanh^2 through a soft-cap)."""
  q, k, v, q_docs, kv_docs, out, lse = res
  batch, lq, heads, d = q.shape
  lk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  bs = cfg.block_size
  qb, qdoc, qpos, sources, lay = _band_setup(q, k, v, q_docs, kv_docs, cfg)
  nbq, dtype = lay.n_q_blocks, qb.dtype

  def blocked_rows(a):  # [b, Lq, H, Dv] -> [b, c, G, R, Q, Dv]
    a = jnp.pad(a.astype(dtype), [(0, 0), (0, nbq * bs - lq), (0, 0), (0, 0)])
    a = a.reshape(batch, nbq, bs, kv_heads, heads // kv_heads, a.shape[-1])
    return jnp.moveaxis(a, 2, 4)

  do = blocked_rows(dout)
  delta = jnp.sum(do * blocked_rows(out), axis=-1)  # do_i . out_i: [b, c, G, R, Q]

  def body(m, carry):
    dq, dk_src, dv_src = carry
    kb, vb, kdoc, kpos = _band(m, sources, nbq, bs)
    s, t = _logits(qb, kb, cfg, _SCORES)
    mask = _visible(qpos, kpos, qdoc, kdoc, cfg.window, cfg.causal)
    p = jnp.exp(jnp.where(mask[:, :, None, None], s - lse[..., None], -jnp.inf))
    dp = jnp.einsum("bcgrqd,bckgd->bcgrqk", do, vb)
    ds = p * (dp - delta[..., None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    ds = ds * cfg.scale
    dq = dq + jnp.einsum("bcgrqk,bckgd->bcqgrd", ds, kb)
    dk_band = jnp.einsum("bcgrqk,bcqgrd->bckgd", ds, qb).reshape(batch, nbq * bs, kv_heads, d)
    dv_band = jnp.einsum("bcgrqk,bcgrqd->bckgd", p, do).reshape(batch, nbq * bs, kv_heads, dv)
    add = lambda acc, x: lax.dynamic_update_slice_in_dim(
        acc, lax.dynamic_slice_in_dim(acc, m * bs, nbq * bs, 1) + x, m * bs, 1)
    return dq, add(dk_src, dk_band), add(dv_src, dv_band)

  init = (jnp.zeros_like(qb), jnp.zeros_like(sources[0]), jnp.zeros_like(sources[1]))
  dq, dk_src, dv_src = lax.fori_loop(0, lay.n_bands, body, init)
  dq = dq.reshape(batch, nbq * bs, heads, d)[:, :lq]

  def fold(g):  # the adjoint of building the source: shift each copy back and sum
    copies = jnp.split(g, lay.copies, axis=1)
    return sum(_shift(c, -lay.offset, lk) for c in copies)

  return (dq.astype(q.dtype), fold(dk_src).astype(k.dtype), fold(dv_src).astype(v.dtype),
          None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --------------------------------------------------------------------------------------------
# Public ops


def _check(q, k, v, q_docs, kv_docs, window, softcap, scale, block_size, name):
  q, k, v = map(jnp.asarray, (q, k, v))
  if q.ndim != 4:
    raise ValueError(f"{name}: q must be [batch, length, heads, head_dim], got {q.shape}")
  batch, lq, heads, d = q.shape
  if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != d:
    raise ValueError(f"{name}: k must be [batch, kv_length, kv_heads, head_dim] with batch "
                     f"{batch} and head_dim {d} (from q {q.shape}), got {k.shape}")
  if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{name}: v must be [batch, kv_length, kv_heads, v_dim] matching k "
                     f"{k.shape} in the first three axes, got {v.shape}")
  if k.shape[1] < lq:
    raise ValueError(f"{name}: k has {k.shape[1]} positions, fewer than q's {lq}")
  if heads % k.shape[2]:
    raise ValueError(f"{name}: q's heads ({heads}) must be a multiple of k's kv_heads "
                     f"({k.shape[2]})")
  q_docs, kv_docs = jnp.asarray(q_docs), jnp.asarray(kv_docs)
  if q_docs.shape != (batch, lq):
    raise ValueError(f"{name}: q_docs must be [batch, q_length] = {(batch, lq)}, got "
                     f"{q_docs.shape}")
  if kv_docs.shape != (batch, k.shape[1]):
    raise ValueError(f"{name}: kv_docs must be [batch, kv_length] = {(batch, k.shape[1])}, got "
                     f"{kv_docs.shape}")
  if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
    raise ValueError(f"{name}: window must be a positive int or None, got {window!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"{name}: softcap must be positive or None, got {softcap!r}")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
  scale = d ** -0.5 if scale is None else float(scale)
  return q, k, v, q_docs.astype(jnp.int32), kv_docs.astype(jnp.int32), scale


def prefix_window_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, q_docs: ArrayLike,
                            kv_docs: ArrayLike, window: int | None = None, causal: bool = True,
                            softcap: float | None = None, scale: float | None = None,
                            impl: str = "auto", block_size: int = 128,
                            q_offset: int | None = None) -> Array:
  """Attention of the last Lq of Lk positions (or of Lq from q_offset on) over all Lk (see the
  module docstring).

  Args:
    q: [batch, Lq, heads, head_dim]; query i sits at key index q_offset + i.
    k: [batch, Lk, kv_heads, head_dim], Lk >= Lq, heads % kv_heads == 0.
    v: [batch, Lk, kv_heads, v_dim].
    q_docs, kv_docs: [batch, Lq] and [batch, Lk] int document numbers; key j is visible from
      query i only if kv_docs[j] == q_docs[i] and kv_docs[j] >= 0 (negative: an empty slot).
    window, causal: the visible span by key index (module docstring); window=None is global.
    softcap: optional logit soft-cap; scale: logit scale, default head_dim^-1/2.
    impl: "reference" | "xla" | "pallas" | "auto" (module docstring); block_size: the xla
      form's block of queries and keys, and the query count up to which "auto" takes the dense
      form (the kernel picks its own blocks).
    q_offset: static int in [0, Lk - Lq], the key index of query 0; None: Lk - Lq (the queries
      are the last keys).
  Returns:
    [batch, Lq, heads, v_dim] in q's dtype.
  """
  name = "prefix_window_attention"
  q, k, v, q_docs, kv_docs, scale = _check(q, k, v, q_docs, kv_docs, window, softcap, scale,
                                           block_size, name)
  lq, lk = q.shape[1], k.shape[1]
  if q_offset is None:
    q_offset = lk - lq
  if not isinstance(q_offset, (int, np.integer)) or not 0 <= q_offset <= lk - lq:
    raise ValueError(f"{name}: q_offset must be a static int in [0, Lk - Lq] = [0, {lk - lq}], "
                     f"got {q_offset!r}")
  cfg = _Config(None if window is None else int(window), bool(causal),
                None if softcap is None else float(softcap), scale, int(block_size),
                int(q_offset))
  from layers.pallas import attention as kernel  # here: the kernel module imports this one

  kw = dict(window=cfg.window, causal=cfg.causal, softcap=cfg.softcap, scale=scale,
            q_offset=cfg.q_offset)
  if impl == "auto" and lq <= block_size:
    impl = "reference"  # one block of queries (decode): the dense form, never the kernel
  else:
    impl = dispatch.resolve(name, impl, lambda: kernel.supports(q, k, v, q_docs, kv_docs, **kw),
                            IMPLEMENTATIONS)
  if impl == "reference":
    return _reference(q, k, v, q_docs, kv_docs, cfg)
  if impl == "xla":
    return _blocked(q, k, v, q_docs, kv_docs, cfg)
  # Under a mesh: batch over data/fsdp, query and kv heads over tensor (whole GQA groups).
  run = lambda q, k, v, q_docs, kv_docs: (kernel.prefix_window_attention_pallas(
      q, k, v, q_docs=q_docs, kv_docs=kv_docs, **kw),)
  heads, rows = (0, 2), (0, None)
  return dispatch.on_mesh(run, (q, k, v, q_docs, kv_docs), (heads, heads, heads, rows, rows),
                          (heads,), batch=q.shape[0], heads=[q.shape[2], k.shape[2]])[0]


def documents(segment_ids: ArrayLike, previous: ArrayLike | None = None) -> Array:
  """[batch, L] int32 document numbers: how many id changes up to each token (0 for the first
  run). `previous` ([batch]) is the id before the sequence: a first token differing from it
  counts as a change (streaming: the cache's last id)."""
  segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
  before = segment_ids[:, :1] if previous is None else jnp.asarray(previous)[:, None]
  shifted = jnp.concatenate([before.astype(jnp.int32), segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(segment_ids != shifted, axis=1, dtype=jnp.int32)


def window_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, window: int | None = None,
                     causal: bool = True, segment_ids: ArrayLike | None = None,
                     softcap: float | None = None, scale: float | None = None,
                     impl: str = "auto", block_size: int = 128) -> Array:
  """Sliding-window (or, window=None, global) softmax attention over one sequence.

  Causal: query i sees keys j with i - window < j <= i; non-causal: |i - j| < window; with
  segment_ids only keys of i's document (a change of id starts a new document).

  Args:
    q: [batch, length, heads, head_dim].
    k: [batch, length, kv_heads, head_dim], heads % kv_heads == 0 (GQA; MQA with 1 kv head).
    v: [batch, length, kv_heads, v_dim].
    window: window in tokens (the query included), or None for global attention.
    segment_ids: optional [batch, length] int document ids.
    softcap: optional soft-cap c of the logits, s -> c tanh(s / c).
    scale: logit scale, default head_dim^-1/2.
    impl: "reference" | "xla" | "pallas" | "auto" (module docstring).
    block_size: query and key block of the xla form (any length; it is padded).
  Returns:
    [batch, length, heads, v_dim] in q's dtype; the softmax runs in float32 (float64 inputs:
    float64).
  """
  q, k = jnp.asarray(q), jnp.asarray(k)
  if q.ndim != 4 or k.ndim != 4 or k.shape[1] != q.shape[1]:
    raise ValueError(f"window_attention: q [batch, length, heads, head_dim] and k [batch, "
                     f"length, kv_heads, head_dim] need the same length, got {q.shape} and "
                     f"{k.shape}")
  batch, length = q.shape[:2]
  if segment_ids is None:
    docs = jnp.zeros((batch, length), jnp.int32)
  else:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
      raise ValueError(f"window_attention: segment_ids must be [batch, length] = "
                       f"{(batch, length)}, got {segment_ids.shape}")
    docs = documents(segment_ids)
  return prefix_window_attention(q, k, v, q_docs=docs, kv_docs=docs, window=window,
                                 causal=causal, softcap=softcap, scale=scale, impl=impl,
                                 block_size=block_size)


# --------------------------------------------------------------------------------------------
# The attention layer


def _check_no_overflow(next_position: Any, max_length: int) -> None:
  """Host-side check of the global cache (run through jax.debug.callback)."""
  top = int(np.max(next_position))
  if top > max_length:  # checked here too: under vmap, lax.cond runs both branches
    raise ValueError(f"Attention: the global KV cache is full: a document reached {top} tokens "
                     f"but max_length is {max_length}; raise Attention.max_length or use a "
                     "sliding window")


def _shard_documents(segment_ids: Array | None, batch: int, length: int,
                     axis: str) -> tuple[Array, Array]:
  """Document numbers and RoPE positions of this shard's T tokens as the whole sequence gives them
  (`documents(all segment ids)`, and t minus the index of the token opening t's document), both
  [batch, T] int32: the id changes inside the shard counted on top of those of the shards before
  it, and the last document start before it. Only the left neighbour's last id and two [batch]
  ints per shard travel."""
  t = sp.shard_index(axis) * length + jnp.arange(length, dtype=jnp.int32)
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32), jnp.broadcast_to(t, (batch, length))
  ids = segment_ids.astype(jnp.int32)
  before = sp.from_previous_shards(ids[:, -1:], 1, axis)
  opened = (ids != jnp.concatenate([before, ids[:, :-1]], axis=1)) & (t > 0)
  count = jnp.cumsum(opened, axis=1, dtype=jnp.int32)
  start = lax.cummax(jnp.where(opened, t, 0), axis=1)
  earlier = (jnp.arange(sp.axis_size(axis)) < sp.shard_index(axis))[:, None]  # [n, 1]
  counts = lax.all_gather(count[:, -1], axis)  # [n, batch]
  starts = lax.all_gather(start[:, -1], axis)
  docs = count + jnp.sum(jnp.where(earlier, counts, 0), axis=0)[:, None]
  start = jnp.maximum(start, jnp.max(jnp.where(earlier, starts, 0), axis=0)[:, None])
  return docs, t - start


def _shard_attention(q: Array, k: Array, v: Array, docs: Array, axis: str, attend: Any,
                     window: int | None, causal: bool) -> Array:
  """This shard's queries [batch, T, heads, head_dim] over the keys of the whole sequence their
  window reaches (k, v, docs: this shard's, k after RoPE), by `attend` (prefix_window_attention)
  with the queries at key index `before` of the span [iT - before, (i + 1) T + after):

    window w:              before = w - 1 (at most (n - 1) T), after = 0 if causal else
                           before: only those keys travel, from the neighbours
                           (`from_previous_shards`, `from_next_shards`)
    causal, global:        gathered keys, before = (n - 1) T, after = 0
    bidirectional, global: the gathered keys as they are (no position enters the mask)

  Keys outside the sequence are zeros in document -1: never visible.
  """
  n, length = sp.axis_size(axis), q.shape[1]
  reach = (n - 1) * length if window is None else min(window - 1, (n - 1) * length)
  before, after = reach, (0 if causal else reach)
  if window is not None:
    span = lambda x, fill: jnp.concatenate(
        [sp.from_previous_shards(x, before, axis, fill=fill), x,
         sp.from_next_shards(x, after, axis, fill=fill)], axis=1)
  elif causal:
    def span(x, fill):
      whole = jnp.pad(sp.gather_sequence(x, axis), [(0, 0), (before, 0)] +
                      [(0, 0)] * (x.ndim - 2), constant_values=fill)
      return lax.dynamic_slice_in_dim(whole, sp.shard_index(axis) * length, before + length,
                                      axis=1)
  else:
    before = None
    span = lambda x, fill: sp.gather_sequence(x, axis)
  return attend(q, span(k, 0), span(v, 0), q_docs=docs, kv_docs=span(docs, -1),
                q_offset=before)


class Attention(nn.Module):
  """Multi-head attention mixer: [batch, length, d_model] -> [batch, length, d_model].

    q = RoPE(norm_q(x W_q)),  k = RoPE(norm_k(x W_k)),  v = x W_v       per head, head_dim each
    y = window_attention(q, k, v; window, softcap) W_o

  num_heads query heads share num_kv_heads key/value heads (GQA; MQA with 1). QK-norm (optional)
  is an RMSNorm over head_dim with one scale shared by the heads, applied before RoPE. RoPE
  positions count from 0 at the start of each document, so packing equals separate runs.

  With `seq_axis` (inside shard_map over that mesh axis, x one shard of the sequence, parallel
  form only): RoPE positions and documents are those of the whole sequence; a sliding
  window takes the w - 1 keys/values before the shard (and after it, if bidirectional) from the
  neighbours, global attention gathers them (see `_shard_attention`).

  Streaming (causal only): the cache holds keys after RoPE, so they are never rotated again.
    window w:     {"k", "v": [batch, w, kv_heads, head_dim], the ring buffer: position p lives
                  in slot p mod w; "slot_position": [batch, w] int32, the position each slot
                  holds (-1: empty)}. With p0 the next position, a slot counts only if it holds
                  the position p in [p0 - w, p0) that maps to it and p >= 0; the current
                  document wrote every such slot, so an earlier document's keys never count.
    global:       {"k", "v": [batch, max_length, kv_heads, head_dim]: position p in slot p}
    both:         {"position": [batch] int32, the next position in the current document;
                  "segment_id": [batch] int32, the last segment id seen (-1 fresh)}
  The ring's memory is fixed by w whatever the number of tokens. A chunk attends to the cache (the
  ring gathered into time order: an O(w) copy, the size of the attention's own read) and
  causally to itself, then writes its last document's keys (its last w of them for the ring). A
  chunk whose first segment id differs from the cache's starts a new document: the cached keys
  become invisible and positions restart at 0. The keys are kept in the activation dtype (the
  dtype given to init_cache), as the parallel form computes them.

  Global cache overflow (a document longer than max_length) is an error, detected where it can
  be: at trace time if one chunk alone is longer than max_length (no segment_ids), otherwise at
  run time by a `jax.debug.callback` that raises ValueError when a document passes max_length
  (tested on CPU: under jit it surfaces as a JaxRuntimeError carrying the message when the
  result is waited for). No position past max_length is ever written or silently wrapped.
  """

  d_model: int
  num_heads: int = 8
  num_kv_heads: int | None = None  # None: num_heads
  head_dim: int | None = None  # None: d_model // num_heads
  window: int | None = None  # None: global attention
  max_length: int = 2048  # global attention's cache size
  causal: bool = True
  use_rope: bool = True
  rope_base: float = 10000.0
  qk_norm: bool = False
  softcap: float | None = None
  scale: float | None = None  # None: head_dim^-1/2
  use_bias: bool = False
  norm_eps: float = 1e-6
  impl: str = "auto"
  block_size: int = 128
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ()

  def _dims(self) -> tuple[int, int, int]:
    heads = self.num_heads
    kv_heads = heads if self.num_kv_heads is None else self.num_kv_heads
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
      raise ValueError(f"Attention: num_heads ({heads}) must be a positive multiple of "
                       f"num_kv_heads ({kv_heads})")
    if self.head_dim is None and self.d_model % heads:
      raise ValueError(f"Attention: d_model ({self.d_model}) must be divisible by num_heads "
                       f"({heads}) unless head_dim is given")
    head_dim = self.d_model // heads if self.head_dim is None else self.head_dim
    if self.use_rope and head_dim % 2:
      raise ValueError(f"Attention: head_dim ({head_dim}) must be even for RoPE")
    if self.window is not None and self.window < 1:
      raise ValueError(f"Attention: window must be a positive int or None, got {self.window}")
    return heads, kv_heads, head_dim

  def _cache_length(self) -> int:
    if self.window is not None:
      return self.window
    if self.max_length < 1:
      raise ValueError(f"Attention: max_length must be positive, got {self.max_length}")
    return self.max_length

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Empty cache (see the class docstring). Works on an unbound module."""
    _, kv_heads, head_dim = self._dims()
    n = self._cache_length()
    cache = {
        "k": jnp.zeros((batch_size, n, kv_heads, head_dim), dtype),
        "v": jnp.zeros((batch_size, n, kv_heads, head_dim), dtype),
        "position": jnp.zeros((batch_size,), jnp.int32),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }
    if self.window is not None:
      cache["slot_position"] = jnp.full((batch_size, n), -1, jnp.int32)
    return cache

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Array] | None = None) -> tuple[Array, Any]:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"Attention(d_model={self.d_model}) got input of shape {x.shape}")
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = self._dims()
    if cache is not None and not self.causal:
      raise ValueError("Attention: streaming with a cache needs causal=True")
    sp.check_parallel_form("Attention", self.seq_axis, cache)
    if segment_ids is not None and segment_ids.shape != (batch, length):
      raise ValueError(f"Attention: segment_ids must be [batch, length] = {(batch, length)}, "
                       f"got {segment_ids.shape}")
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, dtype=x.dtype, name=name)
    q = dense(heads * head_dim, "q_proj")(x).reshape(batch, length, heads, head_dim)
    k = dense(kv_heads * head_dim, "k_proj")(x).reshape(batch, length, kv_heads, head_dim)
    v = dense(kv_heads * head_dim, "v_proj")(x).reshape(batch, length, kv_heads, head_dim)
    if self.qk_norm:
      q = RMSNorm(self.norm_eps, name="q_norm")(q)
      k = RMSNorm(self.norm_eps, name="k_norm")(k)

    t = jnp.arange(length, dtype=jnp.int32)
    if self.seq_axis is not None:
      docs, positions = _shard_documents(segment_ids, batch, length, self.seq_axis)
    else:
      if cache is None:
        docs = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
                else documents(segment_ids))
        previous = None
      else:
        previous = cache["segment_id"]
        docs = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
                else documents(segment_ids, previous))
      # Position within the document: the cache's counter while the cached document goes on,
      # else the distance to the token that opened the document inside this sequence.
      opened = jnp.concatenate([jnp.zeros((batch, 1), bool) if previous is None
                                else (docs[:, :1] > 0), docs[:, 1:] != docs[:, :-1]], axis=1)
      start = lax.cummax(jnp.where(opened, t, 0), axis=1)
      positions = t - start
      if cache is not None:
        positions = jnp.where(docs == 0, cache["position"][:, None] + t, positions)
    if self.use_rope:
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)

    attend = functools.partial(prefix_window_attention, window=self.window, causal=self.causal,
                               softcap=self.softcap, scale=self.scale, impl=self.impl,
                               block_size=self.block_size)
    if self.seq_axis is not None:
      y, new_cache = _shard_attention(q, k, v, docs, self.seq_axis, attend, self.window,
                                      self.causal), None
    elif cache is None:
      y, new_cache = attend(q, k, v, q_docs=docs, kv_docs=docs), None
    else:
      y, new_cache = self._stream(q, k, v, docs, positions, segment_ids, cache, attend)
    y = dense(self.d_model, "o_proj")(y.reshape(batch, length, heads * y.shape[-1]))
    return y, new_cache

  def _stream(self, q, k, v, docs, positions, segment_ids, cache, attend):
    """Attention over [cached keys, chunk keys]; returns (y, the updated cache)."""
    batch, length = q.shape[:2]
    n = self._cache_length()
    expected = (batch, n) + k.shape[2:]
    if cache["k"].shape != expected or cache["v"].shape != expected:
      raise ValueError(f"Attention: cache['k'] and cache['v'] must be {expected}, got "
                       f"{cache['k'].shape} and {cache['v'].shape}")
    if self.window is None and segment_ids is None and length > n:
      raise ValueError(f"Attention: a chunk of {length} tokens of one document cannot fit the "
                       f"global cache of max_length {n}")
    pos0 = cache["position"]
    rows = jnp.arange(batch)[:, None]
    r = jnp.arange(n, dtype=jnp.int32)
    if self.window is not None:
      # The ring in time order: entry r holds position pos0 - w + r (slot (pos0 + r) mod w).
      slot = (pos0[:, None] + r) % n
      held = jnp.take_along_axis(cache["slot_position"], slot, axis=1)
      want = pos0[:, None] - n + r
      cached_doc = jnp.where((held == want) & (want >= 0), 0, -1)
      past_k, past_v = cache["k"][rows, slot], cache["v"][rows, slot]
    else:
      cached_doc = jnp.where(r < pos0[:, None], 0, -1)  # position p sits in slot p
      past_k, past_v = cache["k"], cache["v"]
    # Cached keys carry document number 0: only queries still in the cached document see them.
    keys = jnp.concatenate([past_k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([past_v.astype(v.dtype), v], axis=1)
    y = attend(q, keys, values, q_docs=docs, kv_docs=jnp.concatenate([cached_doc, docs], 1))

    # Write the chunk's last document (only its last w keys for the ring).
    last = docs[:, -1:]
    next_position = positions[:, -1] + 1
    keep = docs == last
    if self.window is not None:
      # Only the last w positions: two tokens for one slot would leave the scatter's choice
      # between them unspecified.
      keep &= positions >= next_position[:, None] - n
      target = jnp.where(keep, positions % n, n)  # n: out of range, dropped
      held = cache["slot_position"].at[rows, target].set(positions, mode="drop")
      new = {"slot_position": held}
    else:
      lax.cond(jnp.any(next_position > n),
               lambda: jax.debug.callback(_check_no_overflow, next_position, n), lambda: None)
      target = jnp.where(keep, positions, n)
      new = {}
    kc, vc = cache["k"], cache["v"]
    new["k"] = kc.at[rows, target].set(k.astype(kc.dtype), mode="drop")
    new["v"] = vc.at[rows, target].set(v.astype(vc.dtype), mode="drop")
    new["position"] = next_position.astype(jnp.int32)
    new["segment_id"] = (cache["segment_id"] if segment_ids is None
                         else segment_ids[:, -1].astype(jnp.int32))
    return y, new
