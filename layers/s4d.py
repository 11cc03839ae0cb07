"""S4D: diagonal state space layers (Gu, Gupta, Goel, Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models").

Per channel h (of H = d_model) the continuous system x'(t) = A x(t) + B u(t), y(t) = C x(t) has a
diagonal complex A with N/2 modes (N = d_state); the other N/2 are the complex conjugates, so
every output is 2 * Re(...) over the kept half (the kept half has Im(A) >= 0 at initialisation).
With step dt the discrete system is
    x_t = dA x_{t-1} + dB u_t,   y_t = 2 Re(C x_t) + D u_t,
    zoh:       dA = exp(dt A),                    dB = (exp(dt A) - 1) / A * B,
    bilinear:  dA = (1 + dt A/2) / (1 - dt A/2),  dB = dt / (1 - dt A/2) * B,
which unrolls into the convolution y = K * u + D u with the Vandermonde kernel
    K[l, h] = 2 Re( sum_n C[h, n] dB[h, n] dA[h, n]^l ),   0 <= l < L,
where dA^l = exp(l log dA) (log dA = dt A for zoh; any branch of the log gives the same integer
powers). The convolution form, the segmented recurrence and the streaming cache all use the same
(log dA, dB), so the three modes agree to rounding.

Initialisations of A (`a_init`), all with N/2 modes and Im(A) >= 0:
  lin     S4D-Lin   A_n = -1/2 + i pi n
  inv     S4D-Inv   A_n = -1/2 + i N/pi (N/(2n+1) - 1)
  legs    S4D-LegS  the diagonal part Lambda of the DPLR form of HiPPO-LegS (`layers.hippo.nplr`),
                    with B from the same decomposition (B in the eigenbasis) by default
  random  A_n = -1/2 + i pi U_n,  U_n ~ Uniform(0, N/2) i.i.d. per SSM and mode: the frequency range
          of S4D-Lin with the frequencies placed at random.

Pure functions: `s4d_lin_init`, `s4d_inv_init`, `s4d_legs_init`, `s4d_random_init`,
`s4d_discretize`, `s4d_kernel`, `default_kernel_chunk_size`. Module: `S4D`, with the three modes of
the mixer interface (convolution, segmented recurrence, streaming), and the methods `ssm` (the
continuous parameters) and `kernel` (the convolution kernel) for inspection. Shapes: x [batch,
length, d_model]; complex parameters are stored as real pairs [..., 2] = (real, imag).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import hippo, sequence_parallel, ssm_layer
from layers.scan import linear_scan

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Initialisations of the diagonal A (half the modes: the conjugates are implicit)


def _check_d_state(d_state: int) -> int:
  if d_state < 2 or d_state % 2:
    raise ValueError(f"d_state must be an even integer >= 2 (the N/2 kept modes come in "
                     f"conjugate pairs), got {d_state}")
  return d_state // 2


def s4d_lin_init(d_state: int) -> np.ndarray:
  """S4D-Lin: A_n = -1/2 + i pi n for n = 0 .. N/2-1. Returns complex128 [N/2]."""
  n = np.arange(_check_d_state(d_state), dtype=np.float64)
  return -0.5 + 1j * np.pi * n


def s4d_inv_init(d_state: int) -> np.ndarray:
  """S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1) for n = 0 .. N/2-1. Returns complex128 [N/2]."""
  n = np.arange(_check_d_state(d_state), dtype=np.float64)
  big_n = float(d_state)
  return -0.5 + 1j * big_n / np.pi * (big_n / (2 * n + 1) - 1)


def s4d_legs_init(d_state: int) -> tuple[np.ndarray, np.ndarray]:
  """S4D-LegS: (A, B), complex128 [N/2] each, from the DPLR form of HiPPO-LegS.

  A is `hippo.nplr("legs", N)`'s Lambda (the eigenvalues of the normal part, Re = -1/2) and B the
  HiPPO B expressed in the same eigenbasis (B = V^* B0, so that with y = 2 Re(C x) the diagonal
  system is the normal part of HiPPO-LegS). Modes are taken with Im(A) >= 0, which hippo already
  does; a mode with Im < 0 would be replaced by its conjugate partner (A and B both conjugated:
  the same real system). The order of the modes is hippo's (ascending Im).
  """
  _check_d_state(d_state)
  lam, _, b, _ = hippo.nplr("legs", d_state)
  lam, b = np.asarray(lam, np.complex128), np.asarray(b, np.complex128)
  flip = lam.imag < 0
  return np.where(flip, lam.conj(), lam), np.where(flip, b.conj(), b)


def s4d_random_init(key: Array, d_state: int, shape: tuple[int, ...] = (),
                    dtype: Any = jnp.float32) -> Array:
  """Random S4D init: A_n = -1/2 + i pi U_n with U_n ~ Uniform(0, N/2) i.i.d.

  Returns complex [*shape, N/2] (complex64 for float32 `dtype`), one draw per entry.
  """
  n2 = _check_d_state(d_state)
  u = jax.random.uniform(key, tuple(shape) + (n2,), dtype, 0.0, float(n2))
  return jax.lax.complex(jnp.full_like(u, -0.5), math.pi * u)


_DETERMINISTIC_A_INITS: dict[str, Callable[[int], np.ndarray]] = {
    "lin": s4d_lin_init, "inv": s4d_inv_init, "legs": lambda n: s4d_legs_init(n)[0]}
_A_INITS = tuple(_DETERMINISTIC_A_INITS) + ("random",)
_B_INITS = ("auto", "ones", "hippo")


# --------------------------------------------------------------------------------------------
# Transforms between the stored parameters and A

_TRANSFORMS = ("exp", "relu", "softplus", "none")
# relu alone would allow Re(A) = 0 (a mode that never decays); the floor keeps -Re(A) >= 1e-4.
_RELU_FLOOR = 1e-4
# exp / softplus cannot reach Im(A) = 0 (S4D-Lin's first mode); such modes start at this value.
_IMAG_FLOOR = 1e-4
# Parameter names by transform: they say what is stored, so a checkpoint cannot be misread.
_REAL_NAMES = {"exp": "log_A_real", "softplus": "A_real_softplus", "relu": "A_real_relu",
               "none": "A_real"}
_IMAG_NAMES = {"none": "A_imag", "exp": "log_A_imag", "softplus": "A_imag_softplus",
               "relu": "A_imag_relu"}


def _transform(name: str, s: Array) -> Array:
  if name == "exp":
    return jnp.exp(s)
  if name == "softplus":
    return jax.nn.softplus(s)
  if name == "relu":
    return jax.nn.relu(s)
  return s


def _inverse_transform(name: str, y, xp=np):
  """s with _transform(name, s) = y, for y > 0 (y >= 0 for relu/none)."""
  if name == "exp":
    return xp.log(y)
  if name == "softplus":
    return y + xp.log(-xp.expm1(-y))  # log(exp(y) - 1) without overflow
  return y


def _real_from_param(name: str, s: Array) -> Array:
  if name == "none":
    return s
  return -(_transform(name, s) + (_RELU_FLOOR if name == "relu" else 0.0))


def _real_to_param(name: str, a_real, xp=np):
  if name == "none":
    return a_real
  return _inverse_transform(name, -a_real - (_RELU_FLOOR if name == "relu" else 0.0), xp)


def _imag_to_param(name: str, a_imag, xp=np):
  if name in ("exp", "softplus"):
    a_imag = xp.maximum(a_imag, _IMAG_FLOOR)
  return _inverse_transform(name, a_imag, xp)


# --------------------------------------------------------------------------------------------
# Discretisation and kernel

_DISCRETIZATIONS = ("zoh", "bilinear")


def _check_discretization(discretization: str) -> None:
  if discretization not in _DISCRETIZATIONS:
    raise ValueError(f"discretization={discretization!r} is not one of {list(_DISCRETIZATIONS)}")


def _expm1_over_z(z: Array) -> Array:
  """(exp(z) - 1) / z, equal to 1 at z = 0 (A = 0 is reachable with the 'none' transforms)."""
  eps = jnp.finfo(jnp.real(z).dtype).eps
  small = jnp.abs(z) < math.sqrt(eps)
  safe = jnp.where(small, jnp.ones_like(z), z)  # keeps NaN out of the unused branch's gradient
  return jnp.where(small, 1.0 + 0.5 * z, jnp.expm1(safe) / safe)


def _log_dA_and_dB(dt: Array, A: Array, B: Array, discretization: str) -> tuple[Array, Array]:
  """(log dA, dB), [..., N/2] complex, broadcast from dt [H], A and B [H, N/2]."""
  _check_discretization(discretization)
  z = dt[..., None] * A
  if discretization == "zoh":
    # dB = (exp(z) - 1) / A * B = dt * expm1(z)/z * B: expm1 keeps the digits for small dt|A|.
    return z, dt[..., None] * _expm1_over_z(z) * B
  # log dA = log((1 + w) / (1 - w)), w = z/2, in a form that keeps float32 digits: the decay
  # log|dA| = 1/2 log1p(4 Re(w) / |1 - w|^2) stays accurate when |dA| is close to 1 (where the
  # difference log|1 + w| - log|1 - w| would cancel), and arg dA = arg((1 + w)(1 - conj w)).
  w_re, w_im = 0.5 * jnp.real(z), 0.5 * jnp.imag(z)
  log_abs = 0.5 * jnp.log1p(4.0 * w_re / ((1.0 - w_re) ** 2 + w_im ** 2))
  angle = jnp.arctan2(2.0 * w_im, (1.0 - w_re) * (1.0 + w_re) - w_im ** 2)
  return jax.lax.complex(log_abs, angle), dt[..., None] / (1.0 - 0.5 * z) * B


def s4d_discretize(dt: Array, A: Array, B: Array,
                   discretization: str = "zoh") -> tuple[Array, Array]:
  """dt: [H] real; A, B: [H, N/2] complex. Returns dA, dB, both [H, N/2] complex.

  zoh:      dA = exp(dt A),                    dB = (exp(dt A) - 1) / A * B
  bilinear: dA = (1 + dt A/2) / (1 - dt A/2),  dB = dt / (1 - dt A/2) * B
  dA is computed as exp(log dA), the same quantity `s4d_kernel` raises to the powers l.
  """
  log_da, db = _log_dA_and_dB(dt, A, B, discretization)
  return jnp.exp(log_da), db


# Vandermonde entries held at once by default: 2^22 complex values (32 MiB in complex64). Above it
# the kernel is built in length chunks, so memory stays bounded however long the sequence is.
KERNEL_CHUNK_ELEMENTS = 1 << 22


def default_kernel_chunk_size(num_modes: int, length: int) -> int | None:
  """Length chunk of `s4d_kernel` when none is given; None when [modes, length] fits at once.

  num_modes = H * N/2 (the Vandermonde rows). The chunk is the largest power of two with
  num_modes * chunk <= KERNEL_CHUNK_ELEMENTS (at least 1).
  """
  if num_modes * length <= KERNEL_CHUNK_ELEMENTS:
    return None
  return 1 << max(0, (KERNEL_CHUNK_ELEMENTS // num_modes).bit_length() - 1)


def s4d_kernel(dt: Array, A: Array, B: Array, C: Array, length: int, *,
               discretization: str = "zoh", chunk_size: int | None = None) -> Array:
  """K[l, h] = 2 Re( sum_n C[h, n] dB[h, n] dA[h, n]^l ) for 0 <= l < length.

  dt: [H]; A, B: [H, N/2] complex; C: [H, N/2] or [channels, H, N/2] complex.
  Returns [length, H] (or [channels, length, H]) in the real dtype matching A's precision.
  dA^l is exp(l log dA), the Vandermonde matrix [H, N/2, chunk], evaluated chunk by chunk along
  the length so that no more than [H, N/2, chunk_size] of it is held; each chunk is recomputed in
  the backward pass rather than stored. chunk_size=None picks `default_kernel_chunk_size(H * N/2,
  length)` (no chunking while H * N/2 * length <= KERNEL_CHUNK_ELEMENTS); chunk_size >= length
  builds the whole matrix at once.

  Precision: dA^l is exact up to the rounding of log dA, which the power multiplies by l. In
  float32 a mode that barely decays over the L steps therefore drifts by ~ l |arg dA| 6e-8 in
  phase (any float32 recurrence does the same), e.g. ~2e-4 relative for LegS, N = 64, bilinear,
  dt = 0.1 at L = 4096, against ~1e-6 for the default S4D-Lin. Float64 parameters (with
  jax_enable_x64) give a float64 kernel.
  """
  if length < 1:
    raise ValueError(f"s4d_kernel: length must be >= 1, got {length}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"s4d_kernel: chunk_size must be >= 1 or None, got {chunk_size}")
  log_da, db = _log_dA_and_dB(dt, A, B, discretization)
  cdb = C * db  # [..., H, N/2]
  c_re, c_im = jnp.real(cdb), jnp.imag(cdb)
  a_re, a_im = jnp.real(log_da), jnp.imag(log_da)
  real_dtype = c_re.dtype
  if chunk_size is None:
    chunk_size = default_kernel_chunk_size(math.prod(a_re.shape), length) or length

  def block(positions):  # positions: [n] -> [..., n, H]
    pos = positions.astype(real_dtype)
    # Real and imaginary parts of dA^l as two real matrices: only Re(C dB dA^l) is needed, so
    # the complex product would spend half its work on an imaginary part that is thrown away.
    mag = jnp.exp(a_re[..., None] * pos)  # [H, N/2, n]
    phase = a_im[..., None] * pos
    return 2.0 * (jnp.einsum("...hn,hnl->...lh", c_re, mag * jnp.cos(phase))
                  - jnp.einsum("...hn,hnl->...lh", c_im, mag * jnp.sin(phase)))

  if chunk_size >= length:
    return block(jnp.arange(length))
  num_chunks = -(-length // chunk_size)
  starts = jnp.arange(num_chunks) * chunk_size
  # checkpoint: the backward pass rebuilds each chunk's Vandermonde instead of storing them all.
  chunk_fn = jax.checkpoint(lambda s: block(s + jnp.arange(chunk_size)))
  chunks = jax.lax.map(chunk_fn, starts)  # [c, ..., n, H]
  chunks = jnp.moveaxis(chunks, 0, -3)  # [..., c, n, H]
  k = chunks.reshape(chunks.shape[:-3] + (num_chunks * chunk_size, chunks.shape[-1]))
  return k[..., :length, :]


# --------------------------------------------------------------------------------------------
# Module


class S4D(nn.Module):
  """The S4D layer: y = out_proj(dropout(act(ssm(x) + D * x))), out_proj = Dense(2 d_model) + GLU.

  x: [batch, length, d_model] -> [batch, length, d_model]. H = d_model channels, each with N/2 =
  d_state/2 complex modes; A and B are shared by groups of H / n_ssm channels. GLU(z) =
  z[..., :H] * sigmoid(z[..., H:]) as in the S4 repo.

  Parameters (complex ones as real pairs [..., 2]; S = n_ssm, default H):
    log_dt [H]          log-uniform in [dt_min, dt_max]; dt = exp(log_dt)
    real part of A [S, N/2], named by `real_transform` (the stored value is the transform's
      argument, initialised as the inverse transform of the `a_init` value):
        "exp"       log_A_real        Re(A) = -exp(log_A_real)              < 0
        "softplus"  A_real_softplus   Re(A) = -softplus(A_real_softplus)    < 0
        "relu"      A_real_relu       Re(A) = -(relu(A_real_relu) + 1e-4)   <= -1e-4
        "none"      A_real            Re(A) = A_real                        no guarantee: training
                                      can reach Re(A) >= 0, where the kernel no longer decays
    imaginary part of A [S, N/2], named by `imag_transform`:
        "none"      A_imag            Im(A) = A_imag
        "exp"       log_A_imag        Im(A) = exp(log_A_imag)               > 0
        "softplus"  A_imag_softplus   Im(A) = softplus(A_imag_softplus)     > 0
        "relu"      A_imag_relu       Im(A) = relu(A_imag_relu)             >= 0
      Stability depends on Re(A) only; the positive transforms keep every kept mode on its side of
      the real axis. Under exp/softplus an initial Im(A) = 0 (S4D-Lin's first mode) starts at 1e-4.
    B [S, N/2, 2]       b_init "ones" (1), "hippo" (the LegS B in the eigenbasis, a_init="legs"
                        only) or "auto" (hippo for legs, ones otherwise)
    C [c, H, N/2, 2]    complex normal, E|C|^2 = 1; c = 2 if bidirectional else 1
    D [H]               standard normal
  Channel h uses SSM group h // (H / n_ssm) (contiguous blocks of channels).
  Bidirectional: the second C row gives an anti-causal kernel that shares A, B and dt with the
  causal one and sees strictly future inputs (as in the S4 repo):
    y_t = sum_{s<=t} K0[t-s] u_s + sum_{s>t} K1[s-t-1] u_s + D u_t.

  Modes of `__call__(x, *, segment_ids=None, cache=None) -> (y, cache)`:
    cache=None, segment_ids=None: convolution mode, `s4d_kernel` + `fft_conv`.
    cache=None, segment_ids given: the recurrence through `linear_scan` (complex state); a change
      of segment id drops the state (a reverse scan for the bidirectional part, same resets).
      The convolution cannot reset at document boundaries, hence this switch.
    cache given: streaming over the chunk, cache = {"state": complex64 [batch, H, N/2],
      "segment_id": int32 [batch]}; a chunk whose first id differs from the cached one starts
      from a zero state. Only for causal layers.
  All three use the same discretisation (`discretization`: "zoh" or "bilinear").
  With `seq_axis` (inside shard_map over that mesh axis, x one shard [batch, T, H] of the
  sequence; cache must be None): the convolution switches to channel sharding
  (`ssm_layer.convolve_sequence_parallel`, the kernel of length n T built for this shard's H/n
  channels only); the recurrence scans the shard with `linear_scan_local` (the forward state from
  the left shards; the reverse one from the right, whose first backward state the anti-causal
  part of the last position also reads from the right neighbour).
  The SSM computes in the parameters' precision, at least float32 (complex64 state), whatever
  x's dtype; the output has x's dtype. The state keeps the cache's dtype.

  Other fields: a_init "lin" | "inv" | "legs" | "random" (see the module docstring; the field
  cannot be called `init`, which is flax's Module.init), scan_impl (passed to `linear_scan`),
  kernel_chunk_size (the length chunk of `s4d_kernel`; None picks one automatically above
  KERNEL_CHUNK_ELEMENTS Vandermonde entries).

  `ssm_param_names` lists every name the SSM-group parameters can take (log_dt, the four names of
  each part of A, B); a given layer has log_dt, B and one name per part of A.
  Inspection: `S4D(...).apply(variables, method="ssm")` -> (dt, A, B, C, D) and
  `S4D(...).apply(variables, length, method="kernel")` -> K [c, length, H].
  """

  d_model: int
  d_state: int = 64
  # Not `init`: that name is flax.linen.Module.init.
  a_init: str = "lin"
  b_init: str = "auto"
  discretization: str = "zoh"
  real_transform: str = "exp"
  imag_transform: str = "none"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  n_ssm: int | None = None
  bidirectional: bool = False
  dropout: float = 0.0
  deterministic: bool = True
  activation: str = "gelu"
  scan_impl: str = "auto"
  kernel_chunk_size: int | None = None
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  # Every name a parameter of the SSM group can have (which ones exist depends on the transforms).
  ssm_param_names = ("log_dt",) + tuple(_REAL_NAMES.values()) + tuple(_IMAG_NAMES.values()) + (
      "B",)

  def _check_fields(self) -> None:
    _check_d_state(self.d_state)
    for field, value, allowed in (("a_init", self.a_init, _A_INITS),
                                  ("b_init", self.b_init, _B_INITS),
                                  ("discretization", self.discretization, _DISCRETIZATIONS),
                                  ("real_transform", self.real_transform, _TRANSFORMS),
                                  ("imag_transform", self.imag_transform, _TRANSFORMS),
                                  ("activation", self.activation, tuple(ssm_layer.ACTIVATIONS))):
      if value not in allowed:
        raise ValueError(f"S4D.{field}={value!r} is not one of {list(allowed)}")
    if self.b_init == "hippo" and self.a_init != "legs":
      raise ValueError(f"S4D.b_init='hippo' is the LegS B in the LegS eigenbasis and needs "
                       f"a_init='legs', got a_init={self.a_init!r}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"S4D needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max}")
    if self.n_ssm is not None and not (1 <= self.n_ssm and self.d_model % self.n_ssm == 0):
      raise ValueError(f"S4D.n_ssm={self.n_ssm} must be a positive divisor of "
                       f"d_model={self.d_model} (A and B are shared by d_model/n_ssm channels)")
    if self.kernel_chunk_size is not None and self.kernel_chunk_size < 1:
      raise ValueError(f"S4D.kernel_chunk_size={self.kernel_chunk_size} must be >= 1 or None")

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Zero state; `dtype` is unused (the state is complex64 whatever the activation dtype)."""
    del dtype
    self._check_streamable()
    return {
        "state": jnp.zeros((batch_size, self.d_model, self.d_state // 2), jnp.complex64),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }

  def _check_streamable(self) -> None:
    ssm_layer.check_streamable("S4D", self.bidirectional)

  def _initial_A_B(self) -> tuple[np.ndarray | None, np.ndarray]:
    """Initial A (complex128 [N/2]; None for 'random') and B (complex128 [N/2])."""
    n2 = self.d_state // 2
    b0 = np.ones(n2, np.complex128)
    if self.a_init == "legs":
      a0, b_legs = s4d_legs_init(self.d_state)
      return a0, b_legs if self.b_init in ("auto", "hippo") else b0
    if self.a_init == "random":
      return None, b0
    return _DETERMINISTIC_A_INITS[self.a_init](self.d_state), b0

  def _create_params(self) -> None:
    """Declares the parameters (see the class docstring for names, shapes and initialisers)."""
    h, n2 = self.d_model, self.d_state // 2
    n_ssm = self.n_ssm or h
    a0, b0 = self._initial_A_B()
    rt, it = self.real_transform, self.imag_transform
    self.param("log_dt", ssm_layer.log_uniform(self.dt_min, self.dt_max), (h,), jnp.float32)
    # The real part of every init is -1/2 (LegS: Re(Lambda), -1/2 up to eigen-solver rounding).
    a_real0 = np.full(n2, -0.5) if a0 is None else a0.real
    self.param(_REAL_NAMES[rt], ssm_layer.constant(_real_to_param(rt, a_real0)), (n_ssm, n2), jnp.float32)
    if a0 is None:
      def imag_init(key, shape, dtype=jnp.float32):
        a_imag = jnp.imag(s4d_random_init(key, self.d_state, shape[:-1], dtype))
        return _imag_to_param(it, a_imag, jnp)
    else:
      imag_init = ssm_layer.constant(_imag_to_param(it, a0.imag))
    self.param(_IMAG_NAMES[it], imag_init, (n_ssm, n2), jnp.float32)
    self.param("B", ssm_layer.constant(ssm_layer.pairs(b0)), (n_ssm, n2, 2), jnp.float32)
    self.param("C", ssm_layer.complex_normal, (2 if self.bidirectional else 1, h, n2, 2), jnp.float32)
    self.param("D", nn.initializers.normal(1.0), (h,), jnp.float32)

  def ssm(self) -> tuple[Array, Array, Array, Array, Array]:
    """The SSM from the stored parameters: dt [H], A [H, N/2], B [H, N/2], C [c, H, N/2], D [H].

    A, B, C complex; A and B expanded from the n_ssm groups to the H channels. Call through
    `S4D(...).apply(variables, method="ssm")`.
    """
    p = self.variables["params"]
    h = self.d_model
    A = jax.lax.complex(_real_from_param(self.real_transform, p[_REAL_NAMES[self.real_transform]]),
                        _transform(self.imag_transform, p[_IMAG_NAMES[self.imag_transform]]))
    B = ssm_layer.as_complex(p["B"])
    n_ssm = A.shape[0]
    if n_ssm != h:
      A, B = jnp.repeat(A, h // n_ssm, axis=0), jnp.repeat(B, h // n_ssm, axis=0)
    return jnp.exp(p["log_dt"]), A, B, ssm_layer.as_complex(p["C"]), p["D"]

  def kernel(self, length: int) -> Array:
    """The convolution kernel K [c, length, H] of the stored parameters (`method="kernel"`)."""
    self._check_fields()
    dt, A, B, C, _ = self.ssm()
    return self._kernel(dt, A, B, C, length)

  def _kernel(self, dt: Array, A: Array, B: Array, C: Array, length: int) -> Array:
    return s4d_kernel(dt, A, B, C, length, discretization=self.discretization,
                      chunk_size=self.kernel_chunk_size)

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Array] | None = None) -> tuple[Array, Any]:
    self._check_fields()
    ssm_layer.check_input("S4D", self.d_model, x)
    sequence_parallel.check_parallel_form("S4D", self.seq_axis, cache)
    if cache is not None:
      self._check_streamable()
    batch, length, _ = x.shape
    self._create_params()
    dt, A, B, C, D = self.ssm()
    # float32 parameters compute in float32 whatever x's dtype; float64 ones in float64.
    real_dtype = jnp.promote_types(dt.dtype, jnp.float32)
    u = x.astype(real_dtype)

    new_cache = None
    axis = self.seq_axis
    if cache is None and segment_ids is None:
      if axis is None:
        y = ssm_layer.convolve(u, self._kernel(dt, A, B, C, length),
                               bidirectional=self.bidirectional)
      else:  # the kernel of length n T for this shard's channels only
        shard = lambda p, channel_axis=0: sequence_parallel.channel_shard(p, axis, channel_axis)
        kernel = lambda full: self._kernel(shard(dt), shard(A), shard(B), shard(C, 1), full)
        y = ssm_layer.convolve_sequence_parallel(u, kernel, bidirectional=self.bidirectional,
                                                 axis=axis)
    else:
      dA, dB = s4d_discretize(dt, A, B, self.discretization)  # [H, N/2]
      a = dA[None, None]  # [1, 1, H, N/2], broadcast by the scan over batch and length
      b = dB * u[..., None].astype(dB.dtype)  # [batch, L, H, N/2]
      initial_state = None
      if cache is not None:
        segment_ids, same_doc = ssm_layer.stream_start(cache, segment_ids, (batch, length))
        initial_state = jnp.where(same_doc[:, None, None], cache["state"], 0).astype(dB.dtype)
      scan = lambda reverse: linear_scan(a, b, initial_state=None if reverse else initial_state,
                                         reverse=reverse, segment_ids=segment_ids,
                                         impl=self.scan_impl)
      if axis is not None:
        scan = lambda reverse: (sequence_parallel.linear_scan_local(
            a, b, segment_ids=segment_ids, axis=axis, reverse=reverse, impl=self.scan_impl), None)
      hs, final = scan(False)
      y = 2.0 * jnp.real(jnp.einsum("blhn,hn->blh", hs, C[0]))
      if self.bidirectional:
        hb, _ = scan(True)
        # The anti-causal part at t reads the backward state of t+1 (strictly future inputs),
        # which is dropped when t+1 starts another document.
        after, same_after = jnp.zeros_like(hb[:, :1]), jnp.zeros((batch, 1), bool)
        if axis is not None:  # t+1 of the last position is the right neighbour's first
          after = sequence_parallel.from_next_shards(hb[:, :1], 1, axis)
          same_after = segment_ids[:, -1:] == sequence_parallel.from_next_shards(
              segment_ids[:, :1], 1, axis, fill=-1)
        nxt = jnp.concatenate([hb[:, 1:], after], axis=1)
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], same_after], axis=1)
        nxt = jnp.where(same[..., None, None], nxt, 0)
        y = y + 2.0 * jnp.real(jnp.einsum("blhn,hn->blh", nxt, C[1]))
      if cache is not None:
        new_cache = {"state": final.astype(cache["state"].dtype),
                     "segment_id": segment_ids[:, -1]}

    out = ssm_layer.output_stage(y, u, D, x.dtype, activation=self.activation,
                                 dropout=self.dropout, deterministic=self.deterministic)
    return out, new_cache
