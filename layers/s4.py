"""S4: structured state spaces with a diagonal-plus-low-rank (DPLR) state matrix (Gu, Goel, Re
2022, "Efficiently Modeling Long Sequences with Structured State Spaces").

Per channel h (of H = d_model) the continuous system x' = A x + B u, y = C x has N = d_state
states. A is stored in the eigenbasis of the normal part of a HiPPO matrix (`layers.hippo.nplr`):
N/2 kept modes Lambda, a rank-r term P and B, with the conjugate modes implied, i.e. the full
conjugate-symmetric complex system of size N

    A_full = diag([Lambda, conj Lambda]) - p p^*,   p = [P; conj P]^T [N, r],
    B_full = [B, conj B],   C_full = [C, conj C],   y = C_full x_full = 2 Re(C x),

which is a real system. Written on the real state s = [Re x, Im x] (x the kept half):

    A_r = [[Re L, -Im L], [Im L, Re L]] - 2 q q^T,  q = [Re P; Im P]^T,
    B_r = [Re B; Im B],   C_r = 2 [Re C, -Im C]      (`dplr_real`, `c_real`).

Discretisation with step dt (per channel), both computed densely on A_r:
  bilinear  Abar = (I - dt/2 A)^-1 (I + dt/2 A),  Bbar = (I - dt/2 A)^-1 dt B;
  zoh       [[Abar, Bbar], [0, 1]] = expm(dt [[A, B], [0, 0]])  (no inverse of A needed).
The discrete system x_t = Abar x_{t-1} + Bbar u_t, y_t = C x_t has the length-L kernel
K[l] = C Abar^l Bbar, l < L, so that y = K * u (+ D u in the layer).

Bilinear kernel (`s4_kernel_bilinear`, the S4 algorithm). Its truncated generating function at
the L roots of unity z_k = exp(-2 pi i k / L) is the DFT of K:

    K^(z) = sum_{l<L} K[l] z^l = C~ (I - z Abar)^-1 Bbar,   C~ = C (I - Abar^L)   (`truncated_c`)
          = 2/(1+z) C~ (g(z) - A)^-1 B,   g(z) = 2/dt (1-z)/(1+z),

and with A = Lambda - p p^* the Woodbury identity turns the resolvent into Cauchy sums
k_ab(z) = sum_n v_ab[n] / (g(z) - lambda_n) over the 2 * N/2 modes. Multiplying through by
2/(1+z) (so that z = -1, where g is infinite, is regular):

    K^(z) = k'_00 - t k'_01 (I_r + t k'_11)^-1 k'_10,    t = (1+z)/2,
    k'_ab = sum_n [v_ab[n] * 2/d_n(z) + conj(v_ab[n]) * 2/conj_d_n(z)],
    d_n(z) = 2/dt (1-z) - (1+z) lambda_n   (conj_d_n: conj(lambda_n), z unchanged),

with v_00 = C~ B, v_01 = C~ P_j, v_10 = conj(P_i) B, v_11 = conj(P_i) P_j. K = irfft(K^) over the
L//2 + 1 non-negative frequencies. The Cauchy sums are evaluated `chunk_size` frequencies at a
time under `lax.map`, so at most [chunk, H, N/2] complex values are live, never [L, N, H].
C~ needs C Abar^L: binary powering of the dense [H, N, N] Abar (log2 L matrix squarings).

Accuracy (float32, measured against float64 explicit powers up to L = 4096): ~1e-6 relative for
LegS (Re(Lambda) = -1/2). LegT / LagT / FouT have Re(Lambda) = 0 (stored at the -1e-4 floor):
where g(z) meets Im(lambda_n) the Cauchy sums grow like 1/|Re lambda_n| ~ 1e4 and the Woodbury
step cancels them, so float32 loses up to ~4 digits there (2e-5 LegT, 1e-4 FouT at N = 8);
float64 and the ZOH path (no Cauchy sums) do not have this problem.

ZOH kernel (`ssm_kernel_by_powers`): the dense expm has no Cauchy structure, so K is formed from
powers in blocks of b steps: the rows C Abar^j (j < b, by doubling) times Abar^{mb} Bbar, scanned
over the L/b blocks. O(L N H (N/b + 1)) work and a sequential loop of L/b steps: slower than the
Cauchy kernel on accelerators, fine for experiments. Its float32 accuracy is set by
`jax.scipy.linalg.expm`, whose squarings amplify rounding when dt ||A|| is large: kernel error
~6e-6 for LegS N = 16, ~5e-5 for N = 64 with dt = 0.1 (bilinear: ~2e-6 for both).

Module: `S4`. Pure functions: `dplr_real`, `c_real`, `discretize`, `truncated_c`,
`s4_kernel_bilinear`, `ssm_kernel_by_powers`, `s4_kernel`, `dense_recurrence`,
`dense_recurrence_local` (its sequence-parallel form).
Shapes: x [batch, length, d_model]; complex parameters are stored as real pairs [..., 2].
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers import hippo, sequence_parallel, ssm_layer

Array = jax.Array

_DISCRETIZATIONS = ("bilinear", "zoh")


# --------------------------------------------------------------------------------------------
# The DPLR system in the real basis, and its discretisation


def dplr_real(Lambda: Array, P: Array, B: Array) -> tuple[Array, Array]:
  """Real-basis form (A_r [..., N, N], B_r [..., N]) of the conjugate-symmetric DPLR system.

  Lambda, B: [..., N/2] complex; P: [r, ..., N/2] complex. A_r = rot(Lambda) - 2 q q^T,
  q = [Re P; Im P]; B_r = [Re B; Im B]. The state s = [Re x, Im x] holds the same N real numbers
  as the kept complex half x.
  """
  lr, li = jnp.real(Lambda), jnp.imag(Lambda)
  rot = jnp.concatenate([
      jnp.concatenate([_diag(lr), _diag(-li)], axis=-1),
      jnp.concatenate([_diag(li), _diag(lr)], axis=-1)], axis=-2)
  q = jnp.concatenate([jnp.real(P), jnp.imag(P)], axis=-1)  # [r, ..., N]
  low_rank = 2.0 * jnp.einsum("r...n,r...m->...nm", q, q)
  return rot - low_rank, jnp.concatenate([jnp.real(B), jnp.imag(B)], axis=-1)


def _diag(v: Array) -> Array:
  return v[..., :, None] * jnp.eye(v.shape[-1], dtype=v.dtype)


def c_real(C: Array) -> Array:
  """C_r = 2 [Re C, -Im C]: [..., N/2] complex -> [..., N] real, so that 2 Re(C x) = C_r . s."""
  return 2.0 * jnp.concatenate([jnp.real(C), -jnp.imag(C)], axis=-1)


def _c_complex(Cr: Array) -> Array:
  """Inverse of `c_real`."""
  n2 = Cr.shape[-1] // 2
  return 0.5 * jax.lax.complex(Cr[..., :n2], -Cr[..., n2:])


def discretize(dt: Array, A: Array, B: Array,
               discretization: str = "bilinear") -> tuple[Array, Array]:
  """Dense discretisation. dt: [H]; A: [H, N, N] real; B: [H, N]. Returns (Abar, Bbar).

  bilinear: Abar = (I - dt/2 A)^-1 (I + dt/2 A), Bbar = (I - dt/2 A)^-1 dt B.
  zoh:      expm(dt [[A, B], [0, 0]]) = [[Abar, Bbar], [0, 1]].
  """
  _check_discretization(discretization)
  n = A.shape[-1]
  eye = jnp.eye(n, dtype=A.dtype)
  dt = dt[..., None, None]
  if discretization == "bilinear":
    lhs = eye - 0.5 * dt * A
    rhs = jnp.concatenate([eye + 0.5 * dt * A, dt * B[..., None]], axis=-1)
    sol = jnp.linalg.solve(lhs, rhs)
    return sol[..., :n], sol[..., n]
  aug = jnp.concatenate([A, B[..., None]], axis=-1)  # [H, N, N+1]
  aug = jnp.concatenate([aug, jnp.zeros_like(aug[..., :1, :])], axis=-2) * dt
  e = jax.scipy.linalg.expm(aug)
  return e[..., :n, :n], e[..., :n, n]


def _check_discretization(discretization: str) -> None:
  if discretization not in _DISCRETIZATIONS:
    raise ValueError(f"S4 discretization={discretization!r} is not one of "
                     f"{list(_DISCRETIZATIONS)}")


def truncated_c(Cr: Array, Abar: Array, length: int) -> Array:
  """C~ = C (I - Abar^L) for row vectors Cr [..., H, N], Abar [H, N, N], by binary powering."""
  power, v, k = Abar, Cr, int(length)
  while k:
    if k & 1:
      v = jnp.einsum("...hn,hnm->...hm", v, power)
    k >>= 1
    if k:
      power = power @ power
  return Cr - v


# --------------------------------------------------------------------------------------------
# Kernels


def _roots(num: int, length: int, dtype) -> tuple[Array, Array]:
  """(1 - z, 1 + z) at z_k = exp(-2 pi i k / length), k < num, without cancellation near 1/-1."""
  theta = (2.0 * math.pi / length) * jnp.arange(num, dtype=dtype)
  half = 0.5 * theta
  s, sh, ch = jnp.sin(theta), jnp.sin(half), jnp.cos(half)
  return jax.lax.complex(2 * sh * sh, s), jax.lax.complex(2 * ch * ch, -s)


def s4_kernel_bilinear(dt: Array, Lambda: Array, P: Array, B: Array, C: Array, length: int, *,
                       chunk_size: int | None = None, truncate: bool = True) -> Array:
  """Bilinear DPLR kernel K[c, l, h] = 2 Re(C[c, h] Abar_h^l Bbar_h), l < length, by Cauchy+FFT.

  dt: [H] real; Lambda, B: [H, N/2] complex; P: [r, H, N/2] complex; C: [c, H, N/2] complex.
  Returns [c, length, H] real. truncate=True folds (I - Abar^L) into C (exact length-L kernel);
  truncate=False treats C as C~ (the S4 repository's parameterisation). chunk_size: frequencies
  per Cauchy block (None: all L//2+1 at once). See the module docstring for the equations.
  """
  if length < 1:
    raise ValueError(f"s4_kernel_bilinear: length must be >= 1, got {length}")
  rank, channels = P.shape[0], C.shape[0]
  if truncate:
    A_r, B_r = dplr_real(Lambda, P, B)
    Abar, _ = discretize(dt, A_r, B_r, "bilinear")
    C = _c_complex(truncated_c(c_real(C), Abar, length))
  left = jnp.concatenate([C, jnp.conj(P)], axis=0)  # [c + r, H, N/2]
  right = jnp.concatenate([B[None], P], axis=0)  # [1 + r, H, N/2]
  v = 2.0 * left[:, None] * right[None]  # [c + r, 1 + r, H, N/2]
  real_dtype = jnp.real(v).dtype
  two_over_dt = (2.0 / dt)[:, None]  # [H, 1]

  def block(omz, opz):  # (1 - z), (1 + z): [F] -> K^ [c, F, H]
    omz, opz = omz[:, None, None], opz[:, None, None]
    r = 1.0 / (two_over_dt * omz - opz * Lambda)  # [F, H, N/2]
    rc = 1.0 / (two_over_dt * omz - opz * jnp.conj(Lambda))
    k = jnp.einsum("abhn,fhn->abfh", v, r) + jnp.einsum("abhn,fhn->abfh", jnp.conj(v), rc)
    t = 0.5 * opz[:, :, 0]  # [F, 1]
    k00, k01 = k[:channels, 0], k[:channels, 1:]  # [c, F, H], [c, r, F, H]
    k10, k11 = k[channels:, 0], k[channels:, 1:]  # [r, F, H], [r, r, F, H]
    if rank == 1:
      x = k10[0] / (1.0 + t * k11[0, 0])
      return k00 - t * k01[:, 0] * x
    m = jnp.eye(rank, dtype=k.dtype) + t[..., None, None] * jnp.moveaxis(k11, (0, 1), (-2, -1))
    x = jnp.linalg.solve(m, jnp.moveaxis(k10, 0, -1)[..., None])[..., 0]  # [F, H, r]
    return k00 - t * jnp.einsum("cjfh,fhj->cfh", k01, x)

  nfreq = length // 2 + 1
  if chunk_size is None or chunk_size >= nfreq:
    kf = block(*_roots(nfreq, length, real_dtype))
  else:
    if chunk_size < 1:
      raise ValueError(f"s4_kernel_bilinear: chunk_size must be >= 1, got {chunk_size}")
    num = -(-nfreq // chunk_size)
    omz, opz = _roots(num * chunk_size, length, real_dtype)  # padding frequencies are dropped
    kf = lax.map(lambda a: block(*a), (omz.reshape(num, chunk_size), opz.reshape(num, chunk_size)))
    kf = jnp.moveaxis(kf, 0, 1).reshape(channels, num * chunk_size, -1)[:, :nfreq]
  return jnp.fft.irfft(kf, n=length, axis=1)


def ssm_kernel_by_powers(Abar: Array, Bbar: Array, Cr: Array, length: int, *,
                         block: int = 64) -> Array:
  """K[c, l, h] = Cr[c, h] Abar_h^l Bbar_h for l < length, from dense real matrices.

  Abar: [H, N, N]; Bbar: [H, N]; Cr: [c, H, N]. Rows Cr Abar^j for j < b (b = block rounded to a
  power of two, at most the length's) are built by doubling, then a scan over ceil(L/b) blocks
  applies them to Abar^{m b} Bbar. Memory [c, b, H, N] + [c, L, H].
  """
  if length < 1:
    raise ValueError(f"ssm_kernel_by_powers: length must be >= 1, got {length}")
  b = 1 << max(0, (min(block, length) - 1).bit_length())
  rows, power = Cr[:, None], Abar  # [c, j, H, N]
  while rows.shape[1] < b:
    rows = jnp.concatenate([rows, jnp.einsum("cjhn,hnm->cjhm", rows, power)], axis=1)
    power = power @ power

  def step(x, _):  # x: Abar^{m b} Bbar [H, N]
    return jnp.einsum("hnm,hm->hn", power, x), jnp.einsum("cjhn,hn->cjh", rows, x)

  num = -(-length // b)
  _, out = lax.scan(step, Bbar, None, length=num)  # [num, c, b, H]
  out = jnp.moveaxis(out, 0, 1).reshape(Cr.shape[0], num * b, -1)
  return out[:, :length]


def s4_kernel(dt: Array, Lambda: Array, P: Array, B: Array, C: Array, length: int, *,
              discretization: str = "bilinear", chunk_size: int | None = None) -> Array:
  """The length-L S4 kernel [c, L, H] (shapes as `s4_kernel_bilinear`) for either discretisation.

  bilinear: Cauchy + Woodbury + FFT (`s4_kernel_bilinear`); zoh: dense expm and block powers
  (`ssm_kernel_by_powers`).
  """
  _check_discretization(discretization)
  if discretization == "bilinear":
    return s4_kernel_bilinear(dt, Lambda, P, B, C, length, chunk_size=chunk_size)
  A_r, B_r = dplr_real(Lambda, P, B)
  Abar, Bbar = discretize(dt, A_r, B_r, "zoh")
  return ssm_kernel_by_powers(Abar, Bbar, c_real(C), length)


# --------------------------------------------------------------------------------------------
# The recurrence


def dense_recurrence(Abar: Array, Bbar: Array, Cr: Array, u: Array, *,
                     initial_state: Array | None = None, segment_ids: Array | None = None,
                     reverse: bool = False, exclusive: bool = False) -> tuple[Array, Array]:
  """s_t = Abar s_{t-1} + Bbar u_t (state dropped where the segment id changes), y_t = Cr s_t.

  Abar: [H, N, N]; Bbar, Cr: [H, N]; u: [batch, L, H]; initial_state: [batch, H, N];
  segment_ids: [batch, L] int. reverse=True runs from the end (s_t = Abar s_{t+1} + ...).
  exclusive=True reads y_t = Cr s_{t-1} (s_{t+1} in reverse) after the reset, i.e. the state of
  strictly earlier (later) tokens of the same document. Returns (y [batch, L, H], final state).
  `lax.scan` token by token: sequential, O(L H N^2) work, state never leaves the carry.
  """
  batch, length, h = u.shape
  dtype = jnp.promote_types(Abar.dtype, jnp.float32)
  s0 = (jnp.zeros((batch, h, Abar.shape[-1]), dtype) if initial_state is None
        else initial_state.astype(dtype))
  if segment_ids is None:
    keep = jnp.ones((batch, length), bool)
  else:
    change = segment_ids[:, 1:] == segment_ids[:, :-1]
    edge = jnp.ones((batch, 1), bool)
    keep = jnp.concatenate([change, edge] if reverse else [edge, change], axis=1)

  def step(s, inp):
    ut, kt = inp
    s = jnp.where(kt[:, None, None], s, 0)
    y_prev = jnp.einsum("hn,bhn->bh", Cr, s)
    s = jnp.einsum("hnm,bhm->bhn", Abar, s) + Bbar * ut[..., None]
    y = y_prev if exclusive else jnp.einsum("hn,bhn->bh", Cr, s)
    return s, y

  xs = (jnp.moveaxis(u.astype(dtype), 1, 0), jnp.moveaxis(keep, 1, 0))
  final, ys = lax.scan(step, s0, xs, reverse=reverse)
  return jnp.moveaxis(ys, 0, 1), final


def dense_recurrence_local(Abar: Array, Bbar: Array, Cr: Array, u: Array, *, axis: str,
                           segment_ids: Array | None = None, reverse: bool = False,
                           exclusive: bool = False) -> Array:
  """`dense_recurrence` on this shard u [batch, T, H] of a sequence split over mesh axis `axis`
  (inside shard_map): the outputs y [batch, T, H] the whole sequence would give here.

  The shard runs from a zero state (y_local, final b), its transition over the shard is
  M = Abar^T where no segment id changes inside it (else 0, the state is dropped), the state
  carried in is h_in(i) = M h_in(i-1) + b_{i-1} over the earlier shards (the later ones when
  reverse; `sequence_parallel.carried_in_states`), and y = y_local + (the recurrence with zero
  inputs from h_in). Two sequential passes over the shard plus an all-gather of [batch, H, N].
  """
  kwargs = dict(segment_ids=segment_ids, reverse=reverse, exclusive=exclusive)
  y, final = dense_recurrence(Abar, Bbar, Cr, u, **kwargs)
  power = jnp.linalg.matrix_power(Abar.astype(final.dtype), u.shape[1])  # [H, N, N]
  if segment_ids is None:
    through = jnp.ones(u.shape[:1], bool)
  else:
    through = jnp.all(segment_ids[:, 1:] == segment_ids[:, :-1], axis=1)  # [batch]
  apply = lambda keep, s: jnp.where(keep[:, None, None], jnp.einsum("hnm,bhm->bhn", power, s), 0)
  h_in = sequence_parallel.carried_in_states(final, through, axis, apply, segment_ids=segment_ids,
                                             reverse=reverse)
  return y + dense_recurrence(Abar, Bbar, Cr, jnp.zeros_like(u), initial_state=h_in, **kwargs)[0]


# --------------------------------------------------------------------------------------------
# Module

# Re(Lambda) = 0 for LegT / LagT / FouT; log(-Re) needs it strictly negative (as the S4 repo).
_MAX_LAMBDA_RE = -1e-4



class S4(nn.Module):
  """The S4 (DPLR) layer: y = out_proj(dropout(act(ssm(x) + D * x))), out_proj = Dense(2H) + GLU.

  x: [batch, length, d_model] -> [batch, length, d_model]; H = d_model channels, each an SSM with
  N = d_state real states (N/2 complex modes plus conjugates) and a rank-`rank` correction.
  A (Lambda, P) and B are shared by groups of H / n_ssm channels (channel h uses group
  h // (H / n_ssm), contiguous blocks as in S4D); C, D and dt are per channel.

  Parameters (complex ones as real pairs [..., 2]; S = n_ssm, default H):
    log_dt [H]                 log-uniform in [dt_min, dt_max]
    log_Lambda_re [S, N/2]     Re(Lambda) = -exp(log_Lambda_re), from nplr(measure) (clamped to
                               <= -1e-4 where the HiPPO value is 0, as the S4 repository)
    Lambda_im [S, N/2]         Im(Lambda) from nplr(measure)
    P [rank, S, N/2, 2]        low-rank term, nplr's V^* P0. Rows above the measure's natural
                               rank start at zero (as the S4 repository); P enters A as P P^*,
                               so a zero row has zero gradient and stays zero in training.
    B [S, N/2, 2]              nplr's V^* B0
    C [c, H, N/2, 2]           complex normal; c = 2 if bidirectional else 1
    D [H]                      standard normal
  C is the true output matrix: the convolution folds (I - Abar^L) into it for the kernel at the
  call's length, so the convolution and the recurrence are the same system at every length.
  Bidirectional: the second row of C gives an anti-causal kernel on strictly future inputs with
  the same A, B, dt: y_t = sum_{s<=t} K0[t-s] u_s + sum_{s>t} K1[s-t-1] u_s + D u_t.

  Modes of `__call__(x, *, segment_ids=None, cache=None) -> (y, cache)`:
    cache=None, segment_ids=None: convolution: `s4_kernel` + `fft_conv`.
    cache=None, segment_ids given: the convolution cannot reset, so the dense recurrence
      (`dense_recurrence`, a token-by-token `lax.scan`, slower) runs with resets at id changes;
      the anti-causal part of a bidirectional layer runs a reverse scan with the same resets.
    cache given: streaming over the chunk with the dense recurrence, cache = {"state": float32
      [batch, H, N] (the real form [Re x, Im x] of the N/2 complex modes: the low-rank term
      couples each mode to its conjugate, so the real form is the natural state), "segment_id":
      int32 [batch]}; a chunk whose first id differs from the cached one starts from zero.
      Causal layers only.
  The SSM computes in float32 whatever x's dtype (the kernel and the recurrence in float64 for
  float64 inputs); the output has x's dtype.
  cauchy_chunk_size: frequencies per Cauchy block in the bilinear kernel (bounds its memory at
  [chunk, H, N/2] complex); None evaluates all L//2+1 frequencies at once.
  With `seq_axis` (inside shard_map over that mesh axis, x one shard [batch, T, H] of the
  sequence; cache must be None): the convolution switches to channel sharding
  (`ssm_layer.convolve_sequence_parallel`, the kernel of length n T built for this shard's H/n
  channels only: every SSM parameter is per channel once expanded from the n_ssm groups); the
  recurrence runs as `dense_recurrence_local` (the carried-in states by all-gather).
  """

  d_model: int
  d_state: int = 64
  rank: int = 1
  n_ssm: int | None = None
  measure: str = "legs"
  discretization: str = "bilinear"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  bidirectional: bool = False
  dropout: float = 0.0
  deterministic: bool = True
  activation: str = "gelu"
  cauchy_chunk_size: int | None = 512
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ("log_dt", "log_Lambda_re", "Lambda_im", "P", "B")

  def _check_fields(self) -> None:
    if self.d_state < 2 or self.d_state % 2:
      raise ValueError(f"S4.d_state must be an even integer >= 2 (N/2 conjugate pairs), got "
                       f"{self.d_state}")
    if self.measure not in hippo.MEASURES:
      raise ValueError(f"S4.measure={self.measure!r} is not one of {list(hippo.MEASURES)}")
    natural = 2 if self.measure == "legt" else 1
    if self.rank < natural:
      raise ValueError(f"S4.rank={self.rank} is too small: measure={self.measure!r} needs "
                       f"rank >= {natural}")
    if self.n_ssm is not None and not (1 <= self.n_ssm and self.d_model % self.n_ssm == 0):
      raise ValueError(f"S4.n_ssm={self.n_ssm} must be a positive divisor of "
                       f"d_model={self.d_model} (A and B are shared by d_model/n_ssm channels)")
    if self.discretization not in _DISCRETIZATIONS:
      raise ValueError(f"S4.discretization={self.discretization!r} is not one of "
                       f"{list(_DISCRETIZATIONS)}")
    if self.activation not in ssm_layer.ACTIVATIONS:
      raise ValueError(f"S4.activation={self.activation!r} is not one of {sorted(ssm_layer.ACTIVATIONS)}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"S4 needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max}")
    if self.cauchy_chunk_size is not None and self.cauchy_chunk_size < 1:
      raise ValueError(f"S4.cauchy_chunk_size must be None or >= 1, got {self.cauchy_chunk_size}")

  def _check_streamable(self) -> None:
    ssm_layer.check_streamable("S4", self.bidirectional)

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Zero state; `dtype` is unused (the state is float32 whatever the activation dtype)."""
    del dtype
    self._check_streamable()
    return {"state": jnp.zeros((batch_size, self.d_model, self.d_state), jnp.float32),
            "segment_id": jnp.full((batch_size,), -1, jnp.int32)}

  def _ssm_params(self) -> tuple[Array, ...]:
    """dt [H], Lambda [H, N/2], P [r, H, N/2], B [H, N/2], C [c, H, N/2] (complex), D [H]."""
    h, n = self.d_model, self.d_state
    groups = self.n_ssm or h
    lam0, p0, b0, _ = hippo.nplr(self.measure, n, self.rank)
    lam_re0 = np.minimum(lam0.real, _MAX_LAMBDA_RE)
    log_dt = self.param("log_dt", ssm_layer.log_uniform(self.dt_min, self.dt_max), (h,), jnp.float32)
    log_re = self.param("log_Lambda_re", ssm_layer.constant(np.log(-lam_re0)), (groups, n // 2),
                        jnp.float32)
    im = self.param("Lambda_im", ssm_layer.constant(lam0.imag), (groups, n // 2), jnp.float32)
    p = self.param("P", ssm_layer.constant(ssm_layer.pairs(p0)[:, None]), (self.rank, groups, n // 2, 2),
                   jnp.float32)
    b = self.param("B", ssm_layer.constant(ssm_layer.pairs(b0)), (groups, n // 2, 2), jnp.float32)
    c = self.param("C", ssm_layer.complex_normal, (2 if self.bidirectional else 1, h, n // 2, 2),
                   jnp.float32)
    d = self.param("D", nn.initializers.normal(1.0), (h,), jnp.float32)
    lam, p, b = jax.lax.complex(-jnp.exp(log_re), im), ssm_layer.as_complex(p), ssm_layer.as_complex(b)
    if groups != h:
      rep = h // groups
      lam, p, b = (jnp.repeat(lam, rep, axis=0), jnp.repeat(p, rep, axis=1),
                   jnp.repeat(b, rep, axis=0))
    return jnp.exp(log_dt), lam, p, b, ssm_layer.as_complex(c), d

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Array] | None = None) -> tuple[Array, Any]:
    self._check_fields()
    ssm_layer.check_input("S4", self.d_model, x)
    sequence_parallel.check_parallel_form("S4", self.seq_axis, cache)
    if cache is not None:
      self._check_streamable()
    batch, length, _ = x.shape
    dt, lam, p, b, c, d = self._ssm_params()
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    u = x.astype(cdtype)
    if cdtype != jnp.float32:  # float64 inputs (tests): the whole SSM in float64
      dt, lam, p, b, c, d = (a.astype(jnp.promote_types(a.dtype, cdtype))
                             for a in (dt, lam, p, b, c, d))

    new_cache = None
    axis = self.seq_axis
    if cache is None and segment_ids is None:
      def kernel(dt, lam, p, b, c, length):
        if self.discretization == "bilinear":
          return s4_kernel_bilinear(dt, lam, p, b, c, length, chunk_size=self.cauchy_chunk_size)
        return s4_kernel(dt, lam, p, b, c, length, discretization="zoh")
      if axis is None:
        y = ssm_layer.convolve(u, kernel(dt, lam, p, b, c, length),
                               bidirectional=self.bidirectional)
      else:  # the kernel of length n T for this shard's channels only
        shard = lambda a, channel_axis=0: sequence_parallel.channel_shard(a, axis, channel_axis)
        params = (shard(dt), shard(lam), shard(p, 1), shard(b), shard(c, 1))
        y = ssm_layer.convolve_sequence_parallel(u, lambda full: kernel(*params, full),
                                                 bidirectional=self.bidirectional, axis=axis)
    else:
      A_r, B_r = dplr_real(lam, p, b)
      Abar, Bbar = discretize(dt, A_r, B_r, self.discretization)
      cr = c_real(c)
      if axis is not None:
        y = dense_recurrence_local(Abar, Bbar, cr[0], u, axis=axis, segment_ids=segment_ids)
        if self.bidirectional:
          y = y + dense_recurrence_local(Abar, Bbar, cr[1], u, axis=axis, reverse=True,
                                         segment_ids=segment_ids, exclusive=True)
      else:
        initial_state = None
        if cache is not None:
          segment_ids, same_doc = ssm_layer.stream_start(cache, segment_ids, (batch, length))
          initial_state = jnp.where(same_doc[:, None, None], cache["state"], 0)
        y, final = dense_recurrence(Abar, Bbar, cr[0], u, initial_state=initial_state,
                                    segment_ids=segment_ids)
        if self.bidirectional:
          y = y + dense_recurrence(Abar, Bbar, cr[1], u, segment_ids=segment_ids, reverse=True,
                                   exclusive=True)[0]
        if cache is not None:
          new_cache = {"state": final.astype(jnp.float32), "segment_id": segment_ids[:, -1]}

    out = ssm_layer.output_stage(y, u, d, x.dtype, activation=self.activation,
                                 dropout=self.dropout, deterministic=self.deterministic)
    return out, new_cache
