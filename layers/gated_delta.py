"""The (gated) delta rule and the Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh 2024).

The gated delta rule, per value head, with state S of shape [dk, dv] (float32):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale S_t^T q_t

g_t <= 0 is the log decay, beta_t the write strength (in (0, 1), or (0, 2) to allow negative
eigenvalues of I - beta k k^T for unit k). g = 0 is the plain delta rule (`delta_rule`).

Shapes: q, k [batch, L, Hk, dk]; v [batch, L, Hv, dv] with Hv a multiple of Hk; g, beta
[batch, L, Hv]; state [batch, Hv, dk, dv]. Grouped heads: value head h reads query/key head
h // (Hv / Hk) (contiguous blocks of value heads share q and k, the layout of `einops.repeat(q,
'... h d -> ... (h r) d')`). dk may differ from dv.

`segment_ids` ([batch, L] int) marks packed documents: at the first token of a new document the
carried state is dropped (S_{t-1} := 0, i.e. exp(g_t) := 0), so `initial_state` only reaches the
first document of each row, as in layers/mamba2.py.

Implementations (`impl=`):
  reference  `lax.scan` token by token: the spec.
  xla        the chunked WY / UT-transform form (see `gated_delta_rule_chunked`): one
             unit-triangular inverse per chunk, matmuls within chunks, a short scan carrying the
             state across chunks. Memory linear in L (autodiff keeps one [dk, dv] state per
             chunk).
  pallas     the Pallas kernels of layers/pallas/gated_delta.py (Triton on GPU, Mosaic on TPU,
             the interpreter on CPU): the same chunked form, one program per (row, value head,
             block of state columns) walking the chunks with the state on chip; the backward
             recomputes each chunk from the states saved at chunk starts. float32 and bfloat16
             inputs; ValueError naming the reason where unsupported.
  auto       pallas on GPU/TPU where the kernel supports the call, else xla (`dispatch.resolve`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers import sequence_parallel
from layers.blocks import RMSNorm, ShortConv
from layers.mamba import dt_bias_init
from layers.pallas import dispatch

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

IMPLEMENTATIONS = ("reference", "xla", "pallas")


def _state_dtype(*arrays: Array) -> jnp.dtype:
  # float32 at least (bf16 inputs accumulate in float32); float64 inputs stay float64.
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check(q, k, v, g, beta, initial_state, segment_ids):
  """Validates shapes; returns the arguments as arrays."""
  q, k, v, g, beta = map(jnp.asarray, (q, k, v, g, beta))
  if q.ndim != 4:
    raise ValueError(f"gated_delta_rule: q must be [batch, length, heads, dim_k], got shape "
                     f"{q.shape}")
  if k.shape != q.shape:
    raise ValueError(f"gated_delta_rule: k must have q's shape {q.shape}, got {k.shape}")
  batch, length, hk, dk = q.shape
  if v.ndim != 4 or v.shape[:2] != (batch, length):
    raise ValueError(f"gated_delta_rule: v must be [batch, length, v_heads, dim_v] with batch, "
                     f"length = {(batch, length)} (from q), got {v.shape}")
  hv, dv = v.shape[2:]
  if hv % hk:
    raise ValueError(f"gated_delta_rule: v heads ({hv}, from v) must be a multiple of q/k heads "
                     f"({hk}, from q)")
  for name, a in (("g", g), ("beta", beta)):
    if a.shape != (batch, length, hv):
      raise ValueError(f"gated_delta_rule: {name} must be [batch, length, v_heads] = "
                       f"{(batch, length, hv)}, got {a.shape}")
  if initial_state is not None:
    initial_state = jnp.asarray(initial_state)
    if initial_state.shape != (batch, hv, dk, dv):
      raise ValueError(f"gated_delta_rule: initial_state must be [batch, v_heads, dim_k, dim_v] "
                       f"= {(batch, hv, dk, dv)}, got {initial_state.shape}")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
      raise ValueError(f"gated_delta_rule: segment_ids must be [batch, length] = "
                       f"{(batch, length)}, got {segment_ids.shape}")
  return q, k, v, g, beta, initial_state, segment_ids


def _resets(segment_ids: Array | None, batch: int, length: int) -> Array:
  """[batch, length] bool: True where the state carried in from t-1 is dropped."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), change], axis=1)


def _prepare(q, k, v, g, beta, initial_state, segment_ids):
  """Checks, casts each input once to the state dtype (so that the gradients of a group's shared
  q/k, summed over its value heads, accumulate in float32, never in bf16), repeats q/k over their
  value heads. Returns (q, k, v, g, beta, S0, resets, dtype)."""
  q, k, v, g, beta, s0, segment_ids = _check(q, k, v, g, beta, initial_state, segment_ids)
  batch, length, hk, dk = q.shape
  hv, dv = v.shape[2:]
  dtype = _state_dtype(q, k, v, g, beta)
  q, k, v, g, beta = (a.astype(dtype) for a in (q, k, v, g, beta))
  q, k = (jnp.repeat(a, hv // hk, axis=2) for a in (q, k))
  s0 = jnp.zeros((batch, hv, dk, dv), dtype) if s0 is None else s0.astype(dtype)
  return q, k, v, g, beta, s0, _resets(segment_ids, batch, length), dtype


def gated_delta_rule_reference(q: ArrayLike, k: ArrayLike, v: ArrayLike, g: ArrayLike,
                               beta: ArrayLike, *, scale: float | None = None,
                               initial_state: ArrayLike | None = None,
                               segment_ids: ArrayLike | None = None) -> tuple[Array, Array]:
  """The recurrence token by token (`lax.scan`); see `gated_delta_rule` for shapes."""
  out_dtype = jnp.asarray(v).dtype
  q, k, v, g, beta, s0, resets, dtype = _prepare(q, k, v, g, beta, initial_state, segment_ids)
  scale = q.shape[-1] ** -0.5 if scale is None else scale

  def step(S, inp):
    q_t, k_t, v_t, g_t, beta_t, reset_t = inp  # [b, H, dk], [b, H, dk], [b, H, dv], [b, H] x2, [b]
    S = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None, None] * S)
    # (I - beta k k^T) S + beta k v^T = S + beta k (v - S^T k)^T: the delta rule's error term.
    err = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S)
    S = S + (beta_t[..., None] * k_t)[..., :, None] * err[..., None, :]
    return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

  inputs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q, k, v, g, beta, resets))
  S, out = lax.scan(step, s0, inputs)
  return jnp.moveaxis(out, 0, 1).astype(out_dtype), S


_BLOCK = 16  # diagonal blocks inverted by substitution; larger blocks by matmul merges


def _unit_lower_inverse_blocked(a: Array) -> Array:
  """(I + a)^{-1} for strictly lower-triangular a [..., C, C].

  The matrix is zero-padded (identity rows) to P = 16 * 2^m >= C. Diagonal 16 x 16 blocks are
  inverted by forward substitution on the identity (16 steps, all blocks at once); then
  neighbouring blocks merge, log2(P / 16) times, by the block formula for lower-triangular M:
    [[M11, 0], [M21, M22]]^{-1} = [[T11, 0], [-T22 M21 T11, T22]],  T11 = M11^{-1}, T22 = M22^{-1}
  so that the sequential part is 16 short steps and the rest is batched matmuls.
  """
  c = a.shape[-1]
  base = min(_BLOCK, c)
  size = base
  while size < c:
    size *= 2
  a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - c), (0, size - c)])

  def diagonal_blocks(m: Array, s: int) -> Array:
    """[..., P, P] -> [..., P / s, s, s]: the diagonal s x s blocks."""
    n = m.shape[-1] // s
    m = m.reshape(m.shape[:-2] + (n, s, n, s))
    return jnp.moveaxis(jnp.diagonal(m, axis1=-4, axis2=-2), -1, -3)

  blocks = diagonal_blocks(a, base)  # [..., n, s, s]

  def row(i, t):
    # (I + a) T = I gives T_i = e_i - sum_{j<i} a_ij T_j; rows j >= i of a are 0, so the rows of
    # T not yet solved (still e_j) do not contribute.
    return t.at[..., i, :].add(-jnp.einsum("...j,...jd->...d", blocks[..., i, :], t))

  eye = jnp.broadcast_to(jnp.eye(base, dtype=a.dtype), blocks.shape)
  t = lax.fori_loop(1, base, row, eye)
  s = base
  while s < size:
    lower_left = diagonal_blocks(a, 2 * s)[..., s:, :s]  # M21 of each pair, [..., n/2, s, s]
    t11, t22 = t[..., 0::2, :, :], t[..., 1::2, :, :]
    t21 = -t22 @ lower_left @ t11
    top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
    t = jnp.concatenate([top, jnp.concatenate([t21, t22], axis=-1)], axis=-2)
    s *= 2
  return t[..., 0, :c, :c]


@jax.custom_jvp
def _unit_lower_inverse(a: Array) -> Array:
  """T = (I + a)^{-1} for strictly lower-triangular a [..., C, C] (only that part is read).

  Not `lax.linalg.triangular_solve`: on CPU its batched LAPACK kernel shares the thread pool of
  the XLA program, and two independent solves (as in a backward pass) can each hold a pool
  thread waiting for the other's work: a deadlock on a 2-core machine (jaxlib 0.10).
  The derivative, dT = -T (da) T with da restricted to the strictly lower triangle, is two
  matmuls, so forward and reverse mode work without differentiating the substitution loop.
  """
  return _unit_lower_inverse_blocked(a)


@_unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
  (a,), (a_dot,) = primals, tangents
  t = _unit_lower_inverse_blocked(a)
  c = a.shape[-1]
  a_dot = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), a_dot, 0.0)
  return t, -(t @ a_dot @ t)


def gated_delta_rule_chunked(q: ArrayLike, k: ArrayLike, v: ArrayLike, g: ArrayLike,
                             beta: ArrayLike, *, scale: float | None = None,
                             initial_state: ArrayLike | None = None,
                             segment_ids: ArrayLike | None = None,
                             chunk_size: int = 64) -> tuple[Array, Array]:
  """The chunked (WY / UT transform) form; see `gated_delta_rule` for shapes.

  Derivation. Write the update as S_t = a_t S_{t-1} + k_t u_t^T with a_t = exp(g_t) and the
  "new value" u_t = beta_t (v_t - a_t S_{t-1}^T k_t). Inside a chunk of C tokens entered with the
  state S_0, let Gamma_i = sum_{j<=i} g_j (in-chunk cumulative log decay), gamma_i = exp(Gamma_i)
  and D[i, j] = exp(Gamma_i - Gamma_j) for j <= i, 0 above. Unrolling,

    S_i = gamma_i S_0 + sum_{j<=i} D[i, j] k_j u_j^T                                        (1)

  and substituting (1) at i-1 (times a_i) into u_i:

    u_i + sum_{j<i} beta_i (k_i . k_j) D[i, j] u_j = beta_i v_i - beta_i gamma_i k_i^T S_0.

  With A = strictly_lower(diag(beta) (K K^T) * D), a unit lower-triangular system per chunk
  (the UT transform; T = (I + A)^{-1} computed once per chunk, for two right-hand sides):

    (I + A) U~ = diag(beta) V,   (I + A) W = diag(beta gamma) K,   U = U~ - W S_0.          (2)

  Then, from (1), the chunk's outputs and its final state:

    O = scale [ diag(gamma) Q S_0 + ((Q K^T) * D) U ]                                        (3)
    S_C = gamma_{C-1} S_0 + (diag(D[C-1, :]) K)^T U                                          (4)

  Everything in (2) and the matrices of (3)-(4) is computed for all chunks at once; only
  U = U~ - W S_0 and (4) run in a `lax.scan` over chunks (the state passing), which keeps (as
  autodiff residuals) one [dk, dv] state per chunk: memory linear in L.

  Numerics: D[i, j] = exp(sum_{j<k<=i} g_k) is built as a masked cumulative sum of the increments
  (not Gamma_i - Gamma_j, which loses precision when Gamma is large), its exponent is <= 0 when
  g <= 0, so exp never overflows, and masked entries are computed from a safe 0 argument so their
  gradients are exactly 0, never NaN. The triangular inverse (`_unit_lower_inverse`: 16 x 16
  blocks by substitution, merged by matmuls) runs in the state dtype.
  Segment resets: r_t marks a document change at t (a_t := 0); n_i counts the resets in positions
  0..i of the chunk. D[i, j] is kept only if n_i == n_j (no reset in (j, i]), gamma_i only if
  n_i == 0 (S_0 reaches token i only before the chunk's first reset).
  Padding: lengths are padded to a multiple of C with q = k = v = 0, g = 0, beta = 0: such a
  token leaves the state unchanged (u = 0) and its output is sliced off.
  """
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1):
    raise ValueError(f"gated_delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
  out_dtype = jnp.asarray(v).dtype
  q, k, v, g, beta, s0, resets, dtype = _prepare(q, k, v, g, beta, initial_state, segment_ids)
  batch, length, heads, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  c = int(min(chunk_size, length))
  n = -(-length // c)
  pad = n * c - length

  def chunks(a):
    """[batch, L, H, ...] -> [batch, n, H, C, ...] (heads before the chunk positions)."""
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape((batch, n, c) + a.shape[2:]), 2, 3)

  qc, kc, vc, gc, bc = (chunks(a) for a in (q, k, v, g, beta))  # [b, n, H, C(, d)]
  nres = jnp.cumsum(chunks(resets.astype(jnp.int32)[..., None])[:, :, 0], axis=-1)  # [b, n, C]

  lower = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  same_doc = (nres[..., :, None] == nres[..., None, :])[:, :, None]  # [b, n, 1, C(i), C(j)]
  # segsum[..., i, j] = sum_{j<k<=i} g_k, summed from the increments (0 on and above the diagonal).
  segsum = jnp.cumsum(jnp.where(strict, jnp.broadcast_to(gc[..., :, None], gc.shape + (c,)), 0.0),
                      axis=-2)
  keep = lower & same_doc
  decay = jnp.where(keep, jnp.exp(jnp.where(keep, segsum, 0.0)), 0.0)  # D, [b, n, H, C, C]
  starts = (nres == 0)[:, :, None]  # [b, n, 1, C]: S_0 reaches these tokens
  cum = jnp.cumsum(gc, axis=-1)  # Gamma, [b, n, H, C]
  gamma = jnp.where(starts, jnp.exp(jnp.where(starts, cum, 0.0)), 0.0)

  # (2): the UT transform.
  a_mat = bc[..., :, None] * jnp.einsum("...ik,...jk->...ij", kc, kc) * decay
  t_mat = _unit_lower_inverse(jnp.where(strict, a_mat, 0.0))  # (I + A)^{-1}
  u_tilde = t_mat @ (bc[..., None] * vc)  # [b, n, H, C, dv]
  w = t_mat @ ((bc * gamma)[..., None] * kc)  # [b, n, H, C, dk]

  # (4) needs the decay to the chunk end of every token and the whole chunk's decay.
  k_end = decay[..., -1, :, None] * kc  # [b, n, H, C, dk]
  gamma_end = gamma[..., -1]  # [b, n, H]

  def pass_state(S, inp):
    u_tilde, w, k_end, gamma_end = inp
    u = u_tilde - jnp.einsum("bhck,bhkv->bhcv", w, S)
    S_next = gamma_end[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", k_end, u)
    return S_next, (S, u)

  inputs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (u_tilde, w, k_end, gamma_end))
  if initial_state is None:
    # Chunk 0 starts from S = 0: U = U~ there and it has no carried-in output, so it is taken
    # out of the scan and no matmul reads a constant zero state. More than a saving: XLA:CPU
    # (jaxlib 0.10.2) can fuse such a matmul with the mixer's later RMSNorm into a YNNPACK kernel
    # that returns wrong rows or NaN (two GatedDeltaNet layers under nn.scan, batch 128, L = 32:
    # test_layer_scanned_batch_rows_equal_single_rows). XLA_FLAGS=
    # --xla_cpu_experimental_ynn_fusion_type= (no YNN fusion) avoids it too.
    first = 1
    u_first = u_tilde[:, 0]
    s_first = jnp.einsum("bhck,bhcv->bhkv", k_end[:, 0], u_first)
    final, (s_in, u) = lax.scan(pass_state, s_first, jax.tree.map(lambda a: a[1:], inputs))
    u = jnp.concatenate([u_first[None], u], axis=0)
  else:
    first = 0
    final, (s_in, u) = lax.scan(pass_state, s0, inputs)
  # [b, n - first, H, dk, dv] (the states entering chunks first..n-1), [b, n, H, C, dv]
  s_in, u = jnp.moveaxis(s_in, 0, 1), jnp.moveaxis(u, 0, 1)

  # (3): the carried-in state's part and the intra-chunk part.
  out = jnp.einsum("bnhck,bnhkv->bnhcv", gamma[:, first:, ..., None] * qc[:, first:], s_in)
  if first:
    out = jnp.concatenate([jnp.zeros((batch, 1, heads, c, dv), out.dtype), out], axis=1)
  attn = jnp.einsum("...ik,...jk->...ij", qc, kc) * decay
  out = scale * (out + jnp.einsum("...ij,...jv->...iv", attn, u))
  out = jnp.moveaxis(out, 3, 2).reshape(batch, n * c, heads, dv)[:, :length]
  return out.astype(out_dtype), final


def gated_delta_rule(q: ArrayLike, k: ArrayLike, v: ArrayLike, g: ArrayLike, beta: ArrayLike, *,
                     scale: float | None = None, initial_state: ArrayLike | None = None,
                     segment_ids: ArrayLike | None = None, impl: str = "auto",
                     chunk_size: int = 64) -> tuple[Array, Array]:
  """Gated delta rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
  o_t = scale S_t^T q_t.

  Args:
    q, k: [batch, length, heads_k, dim_k]. The recurrence is stable for unit-norm k (the layer
      L2-normalises q and k) and beta in [0, 2].
    v: [batch, length, heads_v, dim_v]; heads_v % heads_k == 0, value head h uses q/k head
      h // (heads_v // heads_k).
    g: [batch, length, heads_v] log decay (<= 0).
    beta: [batch, length, heads_v] write strength.
    scale: output scale; default dim_k ** -0.5.
    initial_state: optional [batch, heads_v, dim_k, dim_v] state before the first token (it
      reaches only the first document of each row).
    segment_ids: optional [batch, length] int document ids; a change of id drops the state.
    impl: "reference" | "xla" | "pallas" | "auto" ("pallas" on GPU/TPU where
      `layers.pallas.gated_delta.supports` holds, else "xla").
    chunk_size: chunk length of "xla" and "pallas" (lengths need not be multiples; "pallas"
      needs a power of 2 in [16, 128]).
  Returns:
    out [batch, length, heads_v, dim_v] in v's dtype, final state [batch, heads_v, dim_k, dim_v]
    (float32, or float64 for float64 inputs).
  """
  from layers.pallas import gated_delta as kernel  # here: the kernel module imports this one

  def unsupported() -> str | None:
    arrays = _check(q, k, v, g, beta, initial_state, segment_ids)
    return kernel.supports(*arrays, chunk_size=chunk_size)

  impl = dispatch.resolve("gated_delta_rule", impl, unsupported, IMPLEMENTATIONS)
  kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
  if impl == "reference":
    return gated_delta_rule_reference(q, k, v, g, beta, **kwargs)
  if impl == "pallas":
    # Under a mesh: batch over data/fsdp, q/k and value heads over tensor (whole GQA groups).
    run = lambda q, k, v, g, beta, h0, ids: kernel.gated_delta_rule_pallas(
        q, k, v, g, beta, chunk_size=chunk_size, scale=scale, initial_state=h0, segment_ids=ids)
    heads = (0, 2)
    return dispatch.on_mesh(run, (q, k, v, g, beta, initial_state, segment_ids),
                            (heads, heads, heads, heads, heads, (0, 1), (0, None)),
                            (heads, (0, 1)), batch=q.shape[0], heads=[q.shape[2], v.shape[2]])
  return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)


def delta_rule(q: ArrayLike, k: ArrayLike, v: ArrayLike, beta: ArrayLike, *,
               scale: float | None = None, initial_state: ArrayLike | None = None,
               segment_ids: ArrayLike | None = None, impl: str = "auto",
               chunk_size: int = 64) -> tuple[Array, Array]:
  """The delta rule S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t:
  `gated_delta_rule` with g = 0 (same shapes and arguments, no g)."""
  g = jnp.zeros(jnp.shape(beta), jnp.asarray(beta).dtype)
  return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                          segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# The Gated DeltaNet mixer


def _a_log_init(low: float, high: float):
  """A_log = log(A), A ~ U(low, high); A floored at 1e-6 so U(0, 16) cannot give log(0)."""
  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    a = jax.random.uniform(key, shape, jnp.float32, low, high)
    return jnp.log(jnp.maximum(a, 1e-6)).astype(dtype)

  return init


def _l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  xf = x.astype(jnp.float32)
  return xf * lax.rsqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True) + eps)


def gated_delta_rule_local(q, k, v, g, beta, *, axis: str, segment_ids=None, **kwargs):
  """`gated_delta_rule` on one shard of the sequence, inside shard_map over the mesh axis `axis`:
  the outputs [batch, T, Hv, dv] the whole sequence gives at this shard's positions.

  The state after the shard is affine in the state before it, S_end = M S_start + B with the
  [dk, dk] transition M = prod_t exp(g_t) (I - beta_t k_t k_t^T) (t from last to first). B and the
  local outputs come from running the rule from a zero state; M from running it with v = 0 from
  the identity. The all-gathered (M, B) of the earlier shards fold into the carried-in state, whose
  contribution is the rule run once more with v = 0 from it.
  """
  sequence_parallel.no_initial_state(kwargs, "gated_delta_rule_local")
  out, final = gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids, **kwargs)
  batch, _, hv, _ = v.shape
  dk = k.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(dk, dtype=final.dtype), (batch, hv, dk, dk))
  zeros_k = jnp.zeros(v.shape[:3] + (dk,), v.dtype)
  _, transition = gated_delta_rule(q, k, zeros_k, g, beta, segment_ids=segment_ids,
                                   initial_state=eye, **kwargs)  # [batch, Hv, dk, dk]
  h_in = sequence_parallel.carried_in_states(
      final, transition, axis, lambda m, h: jnp.einsum("bhij,bhjv->bhiv", m, h),
      segment_ids=segment_ids)
  out_in, _ = gated_delta_rule(q, k, jnp.zeros_like(v), g, beta, segment_ids=segment_ids,
                               initial_state=h_in, **kwargs)
  return out + out_in


class GatedDeltaNet(nn.Module):
  """The Gated DeltaNet mixer: [batch, length, d_model] -> [batch, length, d_model].

    q, k, v = SiLU(ShortConv(W_q x)), SiLU(ShortConv(W_k x)), SiLU(ShortConv(W_v x))
    q, k    = q / ||q||, k / ||k||                       (per head, over dim_k)
    beta    = sigmoid(W_b x)            (2 sigmoid(W_b x) if allow_neg_eigval)
    g       = -exp(A_log) softplus(W_a x + dt_bias)     (log decay, per value head)
    o       = gated_delta_rule(q, k, v, g, beta)        (scale dim_k^-1/2)
    out     = W_o (RMSNorm(o) * SiLU(W_g x))            (RMSNorm per value head, weight [dim_v])

  Heads: num_heads q/k heads of dim head_dim_k; num_v_heads value heads (default num_heads; a
  multiple of num_heads, value head h reading q/k head h // (num_v_heads / num_heads)) of dim
  head_dim_v (default expand_v * head_dim_k). Projections have no bias.
  Initialisation as published: A = exp(A_log) ~ U(A_init_range), dt = softplus(dt_bias)
  log-uniform in [dt_min, dt_max] (floored at dt_init_floor). A_log and dt_bias are
  `ssm_param_names` (own learning rate, no weight decay).
  Cache: {"conv": {"q", "k", "v": ShortConv caches}, "ssm": [batch, num_v_heads, head_dim_k,
  head_dim_v] float32, "segment_id": [batch] int32, the last segment id seen (-1 fresh)}; a chunk
  whose first segment id differs from it starts from a zero state.

  With `seq_axis` (inside shard_map over that mesh axis, x one shard of the sequence): the short
  convolutions take their first inputs from the left neighbour and the rule runs as
  `gated_delta_rule_local`.
  """

  d_model: int
  num_heads: int = 4
  head_dim_k: int = 64
  head_dim_v: int | None = None
  expand_v: float = 2.0
  num_v_heads: int | None = None
  conv_size: int = 4
  conv_bias: bool = False
  allow_neg_eigval: bool = False
  A_init_range: tuple[float, float] = (0.0, 16.0)
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ("A_log", "dt_bias")

  def _dims(self) -> tuple[int, int, int, int]:
    """(q/k heads, value heads, dim_k, dim_v), validated."""
    hk = self.num_heads
    hv = hk if self.num_v_heads is None else self.num_v_heads
    dk = self.head_dim_k
    dv = self.head_dim_v
    if dv is None:
      dv = int(round(self.expand_v * dk))
      if dv != self.expand_v * dk:
        raise ValueError(f"GatedDeltaNet: expand_v * head_dim_k = {self.expand_v} * {dk} is not "
                         "an integer; set head_dim_v")
    for name, value in (("num_heads", hk), ("num_v_heads", hv), ("head_dim_k", dk),
                        ("head_dim_v", dv), ("conv_size", self.conv_size)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"GatedDeltaNet: {name} must be a positive int, got {value!r}")
    if hv % hk:
      raise ValueError(f"GatedDeltaNet: num_v_heads = {hv} must be a multiple of num_heads = {hk}")
    return hk, hv, dk, dv

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Zero state, segment id -1. Works on an unbound module."""
    hk, hv, dk, dv = self._dims()
    conv = lambda channels: ShortConv(kernel_size=self.conv_size, d_model=channels,
                                      parent=None).init_cache(batch_size, dtype)
    return {
        "conv": {"q": conv(hk * dk), "k": conv(hk * dk), "v": conv(hv * dv)},
        "ssm": jnp.zeros((batch_size, hv, dk, dv), jnp.float32),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Any] | None = None) -> tuple[Array, Any]:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"GatedDeltaNet(d_model={self.d_model}) got input of shape {x.shape}")
    batch, length, _ = x.shape
    hk, hv, dk, dv = self._dims()
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=x.dtype, name=name)

    conv_caches = {}

    def branch(name: str, features: int) -> Array:
      h = dense(features, f"{name}_proj")(x)
      conv = ShortConv(kernel_size=self.conv_size, use_bias=self.conv_bias,
                       seq_axis=self.seq_axis, name=f"{name}_conv")
      h, conv_caches[name] = conv(h, segment_ids=segment_ids,
                                  cache=None if cache is None else cache["conv"][name])
      return jax.nn.silu(h)

    q = _l2_normalize(branch("q", hk * dk).reshape(batch, length, hk, dk))
    k = _l2_normalize(branch("k", hk * dk).reshape(batch, length, hk, dk))
    v = branch("v", hv * dv).reshape(batch, length, hv, dv)

    beta = jax.nn.sigmoid(dense(hv, "b_proj")(x).astype(jnp.float32))
    if self.allow_neg_eigval:
      beta = 2.0 * beta  # eigenvalues 1 - beta of (I - beta k k^T) in (-1, 1]
    A_log = self.param("A_log", _a_log_init(*self.A_init_range), (hv,), jnp.float32)
    dt_bias = self.param("dt_bias", dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                         (hv,), jnp.float32)
    g = -jnp.exp(A_log) * jax.nn.softplus(dense(hv, "a_proj")(x).astype(jnp.float32) + dt_bias)

    initial_state = None
    if cache is not None:
      initial_state = cache["ssm"]
      if segment_ids is not None:
        # A chunk opening a new document must not see the previous document's state.
        same = segment_ids[:, 0].astype(jnp.int32) == cache["segment_id"]
        initial_state = jnp.where(same[:, None, None, None], initial_state, 0.0)
    rule_kwargs = dict(segment_ids=segment_ids, impl=self.impl, chunk_size=self.chunk_size)
    if self.seq_axis is not None:
      o, state = gated_delta_rule_local(q, k, v, g, beta, axis=self.seq_axis, **rule_kwargs), None
    else:
      o, state = gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, **rule_kwargs)

    gate = dense(hv * dv, "g_proj")(x).reshape(batch, length, hv, dv)
    o = RMSNorm(eps=self.norm_eps, name="o_norm")(o.astype(jnp.float32))
    o = (o * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
    out = dense(self.d_model, "o_proj")(o.reshape(batch, length, hv * dv))

    if cache is None:
      return out, None
    last_id = (cache["segment_id"] if segment_ids is None
               else segment_ids[:, -1].astype(jnp.int32))
    return out, {"conv": conv_caches, "ssm": state.astype(jnp.float32), "segment_id": last_id}
