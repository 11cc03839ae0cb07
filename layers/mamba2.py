"""Mamba-2: the state space duality (SSD) scan and the Mamba-2 mixer block (Dao & Gu 2024).

The SSD recurrence, per head h (scalar decay A_h < 0), with state h_t of shape [P, N]:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          x_t: [P], B_t, C_t: [N], dt_t > 0
    y_t = h_t C_t + D x_t

Shapes: x [batch, L, H, P] (H heads of head dim P); dt [batch, L, H]; A [H]; B, C
[batch, L, G, N] with G groups, head h reading group h // (H / G) (contiguous blocks of heads
share B and C, the Mamba-2 layout); D [H]; state [batch, H, P, N], float32 whatever the input dtype.

Unrolled, the output is a masked "attention" with a 1-semiseparable decay matrix:

    y_i = sum_{j <= i} (C_i . B_j) exp(sum_{k=j+1}^{i} dt_k A) dt_j x_j
          + (C_i exp(sum_{k=0}^{i} dt_k A)) . h_{-1}  + D x_i

`segment_ids` ([batch, L] int) marks packed documents: where the id changes between t-1 and t the
carried state is dropped (exp(dt_t A) is replaced by 0), so nothing crosses a document change.
`initial_state` feeds the first token only.

Implementations (`impl=`):
  reference  `lax.scan` token by token, float32 state: the spec.
  xla        the chunked SSD algorithm: within a chunk, the output as a masked matmul with the decay
             matrix exp(segsum(dt A)); per-chunk states; a short scan passing the state across
             chunks; the chunks' outputs from the carried-in state. Never holds a per-token state.
  pallas     the same chunked algorithm as one Pallas kernel per direction (layers/pallas/ssd.py):
             one program per (batch, head) walks the chunks with the state in float32 registers;
             the backward recomputes chunks from the states saved at chunk starts.
  auto       pallas on GPU/TPU where `layers.pallas.ssd.supports` holds, else xla.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers import sequence_parallel
from layers.blocks import ShortConv
from layers.mamba import dt_bias_init
from layers.pallas import dispatch
from layers.pallas import ssd as pallas_ssd

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

IMPLEMENTATIONS = ("reference", "xla", "pallas")


def _state_dtype(*arrays: Array) -> jnp.dtype:
  # float32 at least (bf16 inputs accumulate in float32); float64 inputs stay float64.
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check(x, dt, A, B, C, D, initial_state, segment_ids):
  """Validates shapes; returns (x, dt, A, B, C, D, initial_state, segment_ids) as arrays."""
  x, dt, A, B, C = map(jnp.asarray, (x, dt, A, B, C))
  if x.ndim != 4:
    raise ValueError(f"ssd: x must be [batch, length, heads, head_dim], got shape {x.shape}")
  batch, length, heads, head_dim = x.shape
  if dt.shape != (batch, length, heads):
    raise ValueError(f"ssd: dt must be [batch, length, heads] = {(batch, length, heads)}, got "
                     f"{dt.shape}")
  if A.shape != (heads,):
    raise ValueError(f"ssd: A must be [heads] = {(heads,)}, got {A.shape}")
  if B.ndim != 4 or B.shape[:2] != (batch, length):
    raise ValueError(f"ssd: B must be [batch, length, groups, d_state] with batch, length = "
                     f"{(batch, length)}, got {B.shape}")
  if C.shape != B.shape:
    raise ValueError(f"ssd: C must have B's shape {B.shape}, got {C.shape}")
  groups, d_state = B.shape[2:]
  if heads % groups:
    raise ValueError(f"ssd: heads ({heads}, from x) must be divisible by groups ({groups}, "
                     "from B)")
  if D is not None:
    D = jnp.asarray(D)
    if D.shape != (heads,):
      raise ValueError(f"ssd: D must be [heads] = {(heads,)}, got {D.shape}")
  if initial_state is not None:
    initial_state = jnp.asarray(initial_state)
    if initial_state.shape != (batch, heads, head_dim, d_state):
      raise ValueError(f"ssd: initial_state must be [batch, heads, head_dim, d_state] = "
                       f"{(batch, heads, head_dim, d_state)}, got {initial_state.shape}")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, length):
      raise ValueError(f"ssd: segment_ids must be [batch, length] = {(batch, length)}, got "
                       f"{segment_ids.shape}")
  return x, dt, A, B, C, D, initial_state, segment_ids


def _resets(segment_ids: Array | None, batch: int, length: int) -> Array:
  """[batch, length] bool: True where the state carried in from t-1 is dropped."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros((batch, 1), bool), change], axis=1)


def _heads_of_groups(B: Array, heads: int) -> Array:
  """[batch, L, G, N] -> [batch, L, H, N]: head h reads group h // (H / G)."""
  return jnp.repeat(B, heads // B.shape[2], axis=2)


def ssd_reference(x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike,
                  D: ArrayLike | None = None, *, initial_state: ArrayLike | None = None,
                  segment_ids: ArrayLike | None = None) -> tuple[Array, Array]:
  """The recurrence token by token (`lax.scan`); see `ssd` for shapes."""
  x, dt, A, B, C, D, h0, segment_ids = _check(x, dt, A, B, C, D, initial_state, segment_ids)
  batch, length, heads, head_dim = x.shape
  dtype = _state_dtype(x, dt, A, B, C, *([] if D is None else [D]))
  # Cast before anything else, so that gradients (summed over heads of a group, over tokens for
  # A) also accumulate in the state dtype, never in bf16.
  xf, dtf, Af, Bf, Cf = (a.astype(dtype) for a in (x, dt, A, B, C))
  Bh, Ch = _heads_of_groups(Bf, heads), _heads_of_groups(Cf, heads)
  if h0 is None:
    h0 = jnp.zeros((batch, heads, head_dim, B.shape[-1]), dtype)
  keep = ~_resets(segment_ids, batch, length)

  def step(h, inp):
    x_t, dt_t, b_t, c_t, keep_t = inp  # [b, H, P], [b, H], [b, H, N], [b, H, N], [b]
    decay = jnp.exp(dt_t * Af) * keep_t[:, None]
    h = decay[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]
    return h, jnp.einsum("bhpn,bhn->bhp", h, c_t)

  inputs = (xf, dtf, Bh, Ch, keep.astype(dtype))
  inputs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), inputs)
  h, y = lax.scan(step, h0.astype(dtype), inputs)
  y = jnp.moveaxis(y, 0, 1)
  if D is not None:
    y = y + D.astype(dtype)[:, None] * xf
  return y.astype(x.dtype), h


def _segsum(a: Array) -> Array:
  """segsum(a)[..., i, j] = sum_{k=j+1}^{i} a[..., k] for j <= i (0 on the diagonal), -inf above.

  Built as a masked cumulative sum of the repeated increments (not cumsum_i - cumsum_j), so no
  difference of two large cumulative sums loses precision or overflows after exp.
  """
  q = a.shape[-1]
  rep = jnp.broadcast_to(a[..., :, None], a.shape + (q,))  # rep[..., i, j] = a_i
  strictly_lower = jnp.tril(jnp.ones((q, q), bool), -1)
  out = jnp.cumsum(jnp.where(strictly_lower, rep, 0.0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((q, q), bool)), out, -jnp.inf)


def ssd_chunked(x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike,
                D: ArrayLike | None = None, *, chunk_size: int = 64,
                initial_state: ArrayLike | None = None,
                segment_ids: ArrayLike | None = None) -> tuple[Array, Array]:
  """The chunked SSD algorithm; see `ssd` for shapes.

  With chunks of Q tokens (the length zero-padded to a multiple of Q; dt = 0 on padding makes
  those steps the identity), a = dt A and, within a chunk, Lmat[i, j] = exp(segsum(a))[i, j]:
    1. diagonal blocks:  Y_diag[i] = sum_j (C_i . B_j) Lmat[i, j] dt_j x_j   (masked matmuls)
    2. chunk states:     S_c = sum_j Lmat[Q-1, j] dt_j x_j B_j^T           (state at the chunk end
                         from the chunk's own tokens)
    3. state passing:    h_c = exp(sum_chunk a) h_{c-1} + S_c, a scan over L/Q chunks from h_{-1}
    4. off-diagonal:     Y_off[i] = exp(sum_{k<=i} a_k) (h_{c-1} C_i)
  Segment resets: r_t marks a document change at t; n_i counts the resets in positions 0..i of
  the chunk. Lmat[i, j] is zeroed unless n_i == n_j (no change in (j, i]), which also masks the
  chunk states to the chunk's last document; the carried state h_{c-1} reaches token i only if
  n_i == 0, and is carried past the chunk only if n_{Q-1} == 0 (else the chunk starts afresh).
  """
  x, dt, A, B, C, D, h0, segment_ids = _check(x, dt, A, B, C, D, initial_state, segment_ids)
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
  batch, length, heads, head_dim = x.shape
  groups, d_state = B.shape[2:]
  rep = heads // groups
  dtype = _state_dtype(x, dt, A, B, C, *([] if D is None else [D]))
  q = int(min(chunk_size, length))
  n_chunks = -(-length // q)
  pad = n_chunks * q - length
  resets = _resets(segment_ids, batch, length)

  def chunks(a, fill=0):
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return a.reshape((batch, n_chunks, q) + a.shape[2:])

  # One cast per input: each cast's cotangent returns in the input dtype, so two casts of the
  # same bf16 input would add their gradients in bf16.
  xf = x.astype(dtype)
  xc = chunks(xf).reshape(batch, n_chunks, q, groups, rep, head_dim)
  dtc = chunks(dt.astype(dtype)).reshape(batch, n_chunks, q, groups, rep)
  Bc, Cc = chunks(B.astype(dtype)), chunks(C.astype(dtype))  # [b, c, Q, G, N]
  nres = jnp.cumsum(chunks(resets.astype(jnp.int32)), axis=2)  # [b, c, Q]

  a = jnp.moveaxis(dtc * A.astype(dtype).reshape(groups, rep), 2, -1)  # [b, c, G, R, Q]
  same_doc = nres[:, :, :, None] == nres[:, :, None, :]  # [b, c, Q(i), Q(j)]
  seg = jnp.where(same_doc[:, :, None, None], _segsum(a), -jnp.inf)
  lmat = jnp.exp(seg)  # [b, c, G, R, Q, Q]
  dtx = dtc[..., None] * xc  # [b, c, Q, G, R, P]

  # 1. Diagonal blocks.
  cb = jnp.einsum("bcign,bcjgn->bcgij", Cc, Bc)
  y = jnp.einsum("bcgij,bcgrij,bcjgrp->bcigrp", cb, lmat, dtx)
  # 2. Chunk states from the chunk's own tokens.
  states = jnp.einsum("bcgrj,bcjgrp,bcjgn->bcgrpn", lmat[..., -1, :], dtx, Bc)
  # 3. State passing across chunks (a short sequential scan: n_chunks steps).
  total = jnp.exp(jnp.sum(a, axis=-1)) * (nres[:, :, -1] == 0)[:, :, None, None]  # [b, c, G, R]
  if h0 is None:
    h0 = jnp.zeros((batch, heads, head_dim, d_state), dtype)
  h0 = h0.astype(dtype).reshape(batch, groups, rep, head_dim, d_state)

  def pass_state(h, inp):
    decay, s = inp
    return decay[..., None, None] * h + s, h

  final, h_in = lax.scan(pass_state, h0, (jnp.moveaxis(total, 1, 0), jnp.moveaxis(states, 1, 0)))
  h_in = jnp.moveaxis(h_in, 0, 1)  # [b, c, G, R, P, N]: state entering each chunk
  # 4. Outputs from the carried-in state. cumsum of a <= 0 terms, so exp never overflows.
  decay_in = jnp.exp(jnp.cumsum(a, axis=-1)) * (nres == 0)[:, :, None, None]  # [b, c, G, R, Q]
  y = y + jnp.einsum("bcign,bcgrpn,bcgri->bcigrp", Cc, h_in, decay_in)

  y = y.reshape(batch, n_chunks * q, heads, head_dim)[:, :length]
  if D is not None:
    y = y + D.astype(dtype)[:, None] * xf
  return y.astype(x.dtype), final.reshape(batch, heads, head_dim, d_state)


def ssd(x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike,
        D: ArrayLike | None = None, *, chunk_size: int = 64,
        initial_state: ArrayLike | None = None, segment_ids: ArrayLike | None = None,
        impl: str = "auto") -> tuple[Array, Array]:
  """Mamba-2 SSD scan: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t.

  Args:
    x: [batch, length, heads, head_dim] inputs.
    dt: [batch, length, heads] step sizes, already positive (softplus and bias applied).
    A: [heads] decay rates (negative).
    B, C: [batch, length, groups, d_state]; heads % groups == 0, head h uses group
      h // (heads // groups).
    D: optional [heads] skip.
    chunk_size: chunk length of the "xla" implementation (lengths need not be multiples); the
      "pallas" kernel uses the largest power of two <= chunk_size, clamped to [16, 64].
    initial_state: optional [batch, heads, head_dim, d_state] state before the first token.
    segment_ids: optional [batch, length] int document ids; a change of id drops the state.
    impl: "reference" | "xla" | "pallas" | "auto" ("pallas" on GPU/TPU when the kernel supports
      the call, else "xla"; see layers.pallas.dispatch). "pallas" raises ValueError naming the
      reason when the kernel does not support the call (float64 inputs, very large states, or a
      sequence too long for TPU VMEM); on CPU it runs in interpret mode.
  Returns:
    y [batch, length, heads, head_dim] in x's dtype, final state [batch, heads, head_dim, d_state]
    (float32, or float64 for float64 inputs).
  """
  x, dt, A, B, C, D, initial_state, segment_ids = _check(x, dt, A, B, C, D, initial_state,
                                                        segment_ids)
  impl = dispatch.resolve(
      "ssd", impl, lambda: pallas_ssd.supports(x, dt, A, B, C, D, chunk_size=chunk_size,
                                               initial_state=initial_state,
                                               segment_ids=segment_ids),
      choices=IMPLEMENTATIONS)
  if impl == "pallas":
    # Under a mesh: batch over data/fsdp, heads (and groups, unless one shared group) over tensor.
    groups = B.shape[2]
    group_dims = (0, None) if groups == 1 else (0, 2)
    return dispatch.on_mesh(
        lambda x, dt, A, B, C, D, h0, ids: pallas_ssd.ssd_pallas(
            x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=h0, segment_ids=ids),
        (x, dt, A, B, C, D, initial_state, segment_ids),
        ((0, 2), (0, 2), (None, 0), group_dims, group_dims, (None, 0), (0, 1), (0, None)),
        ((0, 2), (0, 1)), batch=x.shape[0], heads=[x.shape[2]] + ([groups] * (groups > 1)))
  if impl == "reference":
    return ssd_reference(x, dt, A, B, C, D, initial_state=initial_state, segment_ids=segment_ids)
  if impl == "xla":
    return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                       segment_ids=segment_ids)
  raise ValueError(f"ssd: impl must be one of {list(IMPLEMENTATIONS) + ['auto']}, got {impl!r}")


# --------------------------------------------------------------------------------------------
# The Mamba-2 block


def _a_log_init(low: float, high: float):
  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

  return init


def ssd_local(x, dt, A, B, C, D=None, *, axis: str, segment_ids=None, **kwargs):
  """`ssd` on one shard of the sequence, inside shard_map over the mesh axis `axis`: the outputs
  y [batch, T, heads, head_dim] the whole sequence gives at this shard's positions.

  Runs the shard from a zero state (y_local, final b), probes the per-head decay of the shard
  M = prod_t exp(dt_t A) with zero inputs from a state of ones, folds the all-gathered (M, b) of
  the earlier shards into the carried-in state h_in, and adds y_in_t = C_t (prod_{s<=t} exp(dt_s A))
  h_in by running once more with zero inputs from h_in.
  """
  sequence_parallel.no_initial_state(kwargs, "ssd_local")
  y, final = ssd(x, dt, A, B, C, D, segment_ids=segment_ids, **kwargs)
  zeros = jnp.zeros_like(x)
  _, decay = ssd(zeros, dt, A, B, C, segment_ids=segment_ids, initial_state=jnp.ones_like(final),
                 **kwargs)
  h_in = sequence_parallel.carried_in_states(final, decay, axis, lambda m, h: m * h,
                                             segment_ids=segment_ids)
  y_in, _ = ssd(zeros, dt, A, B, C, segment_ids=segment_ids, initial_state=h_in, **kwargs)
  return y + y_in


class Mamba2(nn.Module):
  """The Mamba-2 mixer: [batch, length, d_model] -> [batch, length, d_model].

    z, xBC, dt = in_proj(u)                       (d_inner, d_inner + 2 G N, H)
    x, B, C    = split(SiLU(ShortConv(xBC)))      (causal depthwise conv, kernel d_conv)
    dt         = clip(softplus(dt + dt_bias), *dt_limit);   A = -exp(A_log)
    y          = ssd(x, dt, A, B, C, D)           (heads H = d_inner / headdim, G = ngroups)
    out        = out_proj(RMSNorm_g(y * SiLU(z)))  (RMSNorm per group of d_inner / G channels)

  d_inner = expand * d_model. Initialisation as published: A_log = log(U(A_init_range)) per head,
  dt log-uniform in [dt_min, dt_max] stored through the inverse softplus, D = 1.
  Cache: {"conv": ShortConv cache of xBC, "ssm": [batch, H, headdim, d_state] float32,
  "segment_id": [batch] int32, the last segment id seen (-1 fresh)}; a chunk whose first segment
  id differs from it starts from a zero SSM state.

  With `seq_axis` (inside shard_map over that mesh axis, u one shard of the sequence): the short
  convolution takes its first inputs from the left neighbour and the SSD runs as `ssd_local`.
  """

  d_model: int
  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  A_init_range: tuple[float, float] = (1.0, 16.0)
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: tuple[float, float] = (0.0, float("inf"))
  chunk_size: int = 64
  conv_bias: bool = True
  use_bias: bool = False
  norm_eps: float = 1e-5
  impl: str = "auto"
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ("A_log", "dt_bias", "D")

  def _dims(self) -> tuple[int, int, int]:
    d_inner = self.expand * self.d_model
    if d_inner % self.headdim:
      raise ValueError(f"Mamba2: expand * d_model = {d_inner} must be divisible by headdim "
                       f"= {self.headdim}")
    heads = d_inner // self.headdim
    if heads % self.ngroups:
      raise ValueError(f"Mamba2: the number of heads ({heads} = expand * d_model / headdim) must "
                       f"be divisible by ngroups = {self.ngroups}")
    if d_inner % self.ngroups:
      raise ValueError(f"Mamba2: d_inner = {d_inner} must be divisible by ngroups")
    return d_inner, heads, d_inner + 2 * self.ngroups * self.d_state

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Zero state, segment id -1. Works on an unbound module."""
    _, heads, conv_dim = self._dims()
    conv = ShortConv(kernel_size=self.d_conv, d_model=conv_dim, parent=None)
    return {
        "conv": conv.init_cache(batch_size, dtype),
        "ssm": jnp.zeros((batch_size, heads, self.headdim, self.d_state), jnp.float32),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }

  @nn.compact
  def __call__(self, u: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Any] | None = None) -> tuple[Array, Any]:
    if u.ndim != 3 or u.shape[-1] != self.d_model:
      raise ValueError(f"Mamba2(d_model={self.d_model}) got input of shape {u.shape}")
    batch, length, _ = u.shape
    d_inner, heads, conv_dim = self._dims()
    g, n, p = self.ngroups, self.d_state, self.headdim

    zxbcdt = nn.Dense(d_inner + conv_dim + heads, use_bias=self.use_bias, dtype=u.dtype,
                      name="in_proj")(u)
    z, xbc, dt = jnp.split(zxbcdt, [d_inner, d_inner + conv_dim], axis=-1)
    conv = ShortConv(kernel_size=self.d_conv, use_bias=self.conv_bias, d_model=conv_dim,
                     seq_axis=self.seq_axis, name="conv")
    xbc, conv_cache = conv(xbc, segment_ids=segment_ids,
                           cache=None if cache is None else cache["conv"])
    xbc = jax.nn.silu(xbc)
    x, B, C = jnp.split(xbc, [d_inner, d_inner + g * n], axis=-1)

    dt_bias = self.param("dt_bias", dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                         (heads,), jnp.float32)
    A_log = self.param("A_log", _a_log_init(*self.A_init_range), (heads,), jnp.float32)
    D = self.param("D", nn.initializers.ones, (heads,), jnp.float32)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
    dt = jnp.clip(dt, self.dt_limit[0], self.dt_limit[1])
    A = -jnp.exp(A_log)

    initial_state = None
    if cache is not None:
      initial_state = cache["ssm"]
      if segment_ids is not None:
        # A chunk opening a new document must not see the previous document's state.
        same = segment_ids[:, 0].astype(jnp.int32) == cache["segment_id"]
        initial_state = initial_state * same[:, None, None, None]
    ssd_args = (x.reshape(batch, length, heads, p), dt, A, B.reshape(batch, length, g, n),
                C.reshape(batch, length, g, n), D)
    ssd_kwargs = dict(chunk_size=self.chunk_size, segment_ids=segment_ids, impl=self.impl)
    if self.seq_axis is not None:
      y, state = ssd_local(*ssd_args, axis=self.seq_axis, **ssd_kwargs), None
    else:
      y, state = ssd(*ssd_args, initial_state=initial_state, **ssd_kwargs)
    y = y.reshape(batch, length, d_inner)

    # Gated RMSNorm, normalised per group (norm(y * silu(z)), the gate before the norm).
    scale = self.param("norm_scale", nn.initializers.ones, (d_inner,), jnp.float32)
    h = (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32)))
    h = h.reshape(batch, length, g, d_inner // g)
    h = h * lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.norm_eps)
    h = (h.reshape(batch, length, d_inner) * scale).astype(u.dtype)
    out = nn.Dense(self.d_model, use_bias=self.use_bias, dtype=u.dtype, name="out_proj")(h)

    if cache is None:
      return out, None
    last_id = (cache["segment_id"] if segment_ids is None
               else segment_ids[:, -1].astype(jnp.int32))
    return out, {"conv": conv_cache, "ssm": state.astype(jnp.float32), "segment_id": last_id}
