"""S5: simplified state space layers (Smith, Warrington, Linderman 2023, "Simplified State Space
Layers for Sequence Modeling").

One MIMO diagonal SSM over all H = d_model channels at once (not one SSM per channel as in S4/S4D).
With P = d_state states, the continuous system x'(t) = Lambda x(t) + B u(t), y(t) = C x(t) + D u(t)
has a complex diagonal Lambda [P], B [P, H], C [H, P] and one step size dt per state. Discretised:
    ZOH:       Lambda_bar = exp(dt Lambda),    B_bar = (Lambda_bar - 1) / Lambda * B
    bilinear:  Lambda_bar = (1 + dt/2 Lambda) / (1 - dt/2 Lambda),
               B_bar = dt / (1 - dt/2 Lambda) * B
    x_t = Lambda_bar x_{t-1} + B_bar u_t,    y_t = factor * Re(C x_t) + D u_t,
run over the length with the parallel scan of `layers/scan.py`.

Conjugate symmetry (`conj_sym=True`, the paper's default): the HiPPO-N spectrum of a real system
comes in conjugate pairs, so only P' = P/2 modes are kept and each stands for itself and its
conjugate; the conjugate half's contribution to y is the complex conjugate of the kept half's, so
y = 2 Re(C x) (factor 2) with a state [batch, P/2]. With `conj_sym=False` all P' = P modes are
kept, nothing ties them in pairs during training, and y = Re(C x) (factor 1).

Initialisation (the paper's code): Lambda from the eigenvalues of HiPPO-N (the normal part of the
HiPPO-LegS matrix, `layers.hippo.nplr("legs", P/J)`), block-diagonal with J = `blocks` copies;
B and C are drawn in the original (HiPPO) basis and mapped into the eigenbasis with the
block-diagonal eigenvector matrix V: B <- V^{-1} B = V^* B, C <- C V.

Pure functions: `hippo_n_init`, `s5_discretize`, `s5_ssm`. Module: `S5` (parallel scan form with
segment resets, and streaming through the cache). Shapes: x [batch, length, d_model]; complex
parameters are stored as real pairs [..., 2] = (real, imag).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import sequence_parallel, ssm_layer
from layers.hippo import nplr
from layers.scan import linear_scan

Array = jax.Array

# Re(Lambda) is clipped to at most this value where the layer uses it (`clip_eigs=True`, as in the
# paper's code): a mode whose real part trains to >= 0 would make |Lambda_bar| >= 1 and the
# recurrence grow without bound. Parameters below the bound are untouched; above it the clip
# passes no gradient, so Lambda_re then stays where it is until other parameters move it.
MAX_EIG_REAL = -1e-4

DISCRETIZATIONS = ("zoh", "bilinear")
C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")


# --------------------------------------------------------------------------------------------
# Initialisation of Lambda and the eigenbasis


def _check_sizes(d_state: int, blocks: int, name: str = "hippo_n_init") -> int:
  """Returns the block size P/J; it must be an even integer (conjugate pairs)."""
  if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1:
    raise ValueError(f"{name}: blocks must be a positive int, got {blocks!r}")
  if d_state % blocks or (d_state // blocks) < 2 or (d_state // blocks) % 2:
    raise ValueError(f"{name}: d_state={d_state} must split into blocks={blocks} blocks of an "
                     f"even size >= 2 (each block holds conjugate pairs of HiPPO-N eigenvalues)")
  return d_state // blocks


def _block_diag(block: np.ndarray, count: int) -> np.ndarray:
  rows, cols = block.shape
  out = np.zeros((rows * count, cols * count), block.dtype)
  for j in range(count):
    out[j * rows:(j + 1) * rows, j * cols:(j + 1) * cols] = block
  return out


@functools.lru_cache(maxsize=32)
def _hippo_n_cached(d_state: int, blocks: int, conj_sym: bool) -> tuple[np.ndarray, np.ndarray]:
  n = _check_sizes(d_state, blocks)
  lam, _, _, v = nplr("legs", n)
  lam, v = np.asarray(lam, np.complex128), np.asarray(v, np.complex128)
  if not conj_sym:
    lam = np.concatenate([lam, lam.conj()])
    v = np.concatenate([v, v.conj()], axis=1)
  lam, v = np.tile(lam, blocks), _block_diag(v, blocks)
  lam.flags.writeable = v.flags.writeable = False  # shared by every caller of the cache
  return lam, v


def hippo_n_init(d_state: int, blocks: int = 1,
                 conj_sym: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """HiPPO-N eigenvalues and eigenvectors, block-diagonal with `blocks` equal blocks.

  Each block of size N = d_state / blocks is the normal part of HiPPO-LegS (N x N) diagonalised,
  S = V_N diag(Lambda_N) V_N^*, from `layers.hippo.nplr("legs", N)` (which keeps one eigenvalue
  of each conjugate pair, N/2 modes, with its eigenvector).
  conj_sym=True: the kept halves only: Lambda [d_state/2], V [d_state, d_state/2].
  conj_sym=False: the full spectrum, each block's kept modes followed by their conjugates
  (eigenvectors conjugated too): Lambda [d_state], V [d_state, d_state], unitary.
  Returns (Lambda complex128, V complex128); V is block-diagonal, block j mapping the states
  j*P'/J .. (j+1)*P'/J - 1 to the original coordinates j*N .. (j+1)*N - 1.
  """
  _check_sizes(d_state, blocks)
  lam, v = _hippo_n_cached(int(d_state), int(blocks), bool(conj_sym))
  return lam.copy(), v.copy()


# --------------------------------------------------------------------------------------------
# Discretisation and the SSM


def _expm1(z: Array) -> Array:
  """exp(z) - 1 for complex z without the cancellation of exp(z) - 1 at small |z|.

  exp(x + iy) - 1 = (expm1(x) cos y - 2 sin^2(y/2)) + i exp(x) sin y. With dt ~ 1e-3 and
  |Lambda| ~ 1, |z| ~ 1e-3 and the direct difference would lose 3 of float32's 7 digits.
  """
  x, y = jnp.real(z), jnp.imag(z)
  re = jnp.expm1(x) * jnp.cos(y) - 2.0 * jnp.sin(0.5 * y) ** 2
  return jax.lax.complex(re, jnp.exp(x) * jnp.sin(y))


def s5_discretize(Lambda: Array, B: Array, dt: Array,
                  method: str = "zoh") -> tuple[Array, Array]:
  """Discretise the diagonal system with one step per state.

  Lambda: [P'] complex; B: [P', H] complex; dt: [P'] real (> 0).
    zoh:       Lambda_bar = exp(dt Lambda),  B_bar = (exp(dt Lambda) - 1) / Lambda * B
    bilinear:  Lambda_bar = (1 + dt Lambda/2) / (1 - dt Lambda/2),
               B_bar = dt / (1 - dt Lambda/2) * B
  Returns (Lambda_bar [P'], B_bar [P', H]) complex.
  """
  # Lambda_bar is formed as 1 + (small increment computed to full relative precision), so it is
  # rounded once: the recurrence raises it to the power t, turning its rounding error into a
  # t-fold larger error of the impulse response at lag t.
  dt = dt.astype(jnp.real(Lambda).dtype)
  dt_lambda = dt * Lambda
  if method == "zoh":
    increment = _expm1(dt_lambda)  # exp(dt Lambda) - 1
    return 1.0 + increment, (increment / Lambda)[:, None] * B
  if method == "bilinear":
    inv = 1.0 / (1.0 - 0.5 * dt_lambda)
    return 1.0 + dt_lambda * inv, (inv * dt)[:, None] * B
  raise ValueError(f"s5_discretize: method must be one of {DISCRETIZATIONS}, got {method!r}")


def s5_ssm(u: Array, Lambda_bar: Array, B_bar: Array, C: Array, *, conj_sym: bool = True,
           initial_state: Array | None = None, segment_ids: Array | None = None,
           impl: str = "auto", seq_axis: str | None = None) -> tuple[Array, Array]:
  """The discrete S5 system over a sequence, by the parallel scan (without the D skip).

    x_t = Lambda_bar x_{t-1} + B_bar u_t          (forward, from `initial_state`)
    y_t = factor * Re(C[0] x_t)                   factor = 2 if conj_sym else 1
  With two rows of C (bidirectional, as in the paper's code) a reverse scan over the same inputs,
    z_t = Lambda_bar z_{t+1} + B_bar u_t,   y_t += factor * Re(C[1] z_t),
  i.e. both directions see u_t itself and the two outputs are summed.

  Args:
    u: [batch, length, H] real inputs.
    Lambda_bar: [P'] complex; B_bar: [P', H] complex; C: [c, H, P'] complex, c = 1 or 2.
    initial_state: [batch, P'] complex, the forward state before the first token (zeros).
      Not allowed with c = 2 (the reverse scan has no carried-in state).
    segment_ids: [batch, length] int; a change of id drops the state in both directions.
    impl: the `linear_scan` implementation.
    seq_axis: a mesh axis (inside shard_map) over which the sequence is split, u being one shard:
      both scans run as `sequence_parallel.linear_scan_local` (the state carried in from the
      shards before, or after for the reverse scan). No initial_state then.
  Returns (y [batch, length, H] real, final forward state [batch, P'] complex; with seq_axis the
  state at this shard's last position). The state dtype is the promoted dtype of the inputs, at
  least complex64.
  """
  if u.ndim != 3:
    raise ValueError(f"s5_ssm: u must be [batch, length, H], got shape {u.shape}")
  if C.ndim != 3 or C.shape[0] not in (1, 2):
    raise ValueError(f"s5_ssm: C must be [1 or 2, H, P'], got shape {C.shape}")
  if B_bar.shape != (Lambda_bar.shape[0], u.shape[-1]) or C.shape[1:] != B_bar.shape[::-1]:
    raise ValueError(f"s5_ssm: shapes do not agree: u {u.shape}, Lambda_bar {Lambda_bar.shape}, "
                     f"B_bar {B_bar.shape} (want [P', H]), C {C.shape} (want [c, H, P'])")
  if C.shape[0] == 2 and initial_state is not None:
    raise ValueError("s5_ssm: initial_state is only defined for the causal SSM (one row of C); "
                     "the bidirectional reverse scan has no carried-in state")
  if seq_axis is not None and initial_state is not None:
    raise ValueError("s5_ssm: with seq_axis every sequence starts from a zero state; "
                     "initial_state is not supported")
  real = jnp.promote_types(jnp.real(Lambda_bar).dtype, jnp.promote_types(u.dtype, jnp.float32))
  u = u.astype(real)
  # B_bar u and Re(C x) in real arithmetic: two real matmuls each instead of complex ones.
  bu = jax.lax.complex(jnp.einsum("blh,ph->blp", u, jnp.real(B_bar).astype(real)),
                       jnp.einsum("blh,ph->blp", u, jnp.imag(B_bar).astype(real)))
  a = Lambda_bar[None, None]  # [1, 1, P'], broadcast by the scan over batch and length
  factor = 2.0 if conj_sym else 1.0

  def readout(x, c):  # Re(c x) for x [batch, L, P'], c [H, P']
    return (jnp.einsum("blp,hp->blh", jnp.real(x), jnp.real(c).astype(real))
            - jnp.einsum("blp,hp->blh", jnp.imag(x), jnp.imag(c).astype(real)))

  def scan(reverse):
    if seq_axis is None:
      return linear_scan(a, bu, initial_state=initial_state, segment_ids=segment_ids,
                         reverse=reverse, impl=impl)
    xs = sequence_parallel.linear_scan_local(a, bu, segment_ids=segment_ids, axis=seq_axis,
                                             reverse=reverse, impl=impl)
    return xs, xs[:, -1]

  xs, final = scan(False)
  y = readout(xs, C[0])
  if C.shape[0] == 2:
    zs, _ = scan(True)
    y = y + readout(zs, C[1])
  return factor * y, final


# --------------------------------------------------------------------------------------------
# Module


# jax.nn.initializers' truncated normal is cut at +-2 standard deviations; dividing by this
# constant (the std of a unit normal truncated there) restores unit variance.
_TRUNC_STD = 0.87962566103423978


def _truncated_normal(key: Array, shape: tuple[int, ...], variance: float) -> Array:
  z = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
  return z * (math.sqrt(variance) / _TRUNC_STD)


class S5(nn.Module):
  """The S5 layer: y = out_proj(dropout(act(ssm(x) + D * x))), out_proj = Dense(2 d_model) + GLU.

  x: [batch, length, d_model] -> [batch, length, d_model]. One MIMO SSM with P = d_state states
  over all H = d_model channels (see the module docstring for the equations); GLU(z) =
  z[..., :H] * sigmoid(z[..., H:]), as in layers/s4d.py. P' = d_state/2 kept modes if conj_sym
  (output factor 2) else d_state (factor 1).

  Parameters (complex ones as real pairs [..., 2]); P = d_state, J = blocks:
    Lambda_re [P'], Lambda_im [P']  HiPPO-N eigenvalues, J blocks of size P/J (`hippo_n_init`)
    B [P', H, 2]                    V^{-1} B0, B0 [P, H] real lecun normal as in the paper's code
                                    (truncated normal, variance 1 / fan_in with fan_in = P: the
                                    first axis of B0's shape (P, H))
    C [c, H, P', 2]                 c = 2 if bidirectional else 1, each row drawn independently:
      "trunc_standard_normal"  C0 [H, P] complex, real and imaginary parts truncated normal with
                               variance 1/P (the paper's per-row lecun normal), then C = C0 V
      "lecun_normal"           C0 as above with variance 1/(H P) (lecun normal over the
                               (H, P, 2) array, fan_in = P * H), then C = C0 V
      "complex_normal"         C drawn directly in the eigenbasis, E|C|^2 = 1 (real and
                               imaginary parts of variance 1/2), not mapped by V
    D [H]                           standard normal
    log_dt [P']                     log-uniform in [dt_min, dt_max], one step per kept mode
  At use: dt = step_rescale * exp(log_dt), so a model trained at one sampling rate runs at another
  (e.g. step_rescale = 2 for a sequence sampled half as often); Re(Lambda) = min(Lambda_re,
  MAX_EIG_REAL) = min(Lambda_re, -1e-4) when clip_eigs (no gradient through a clipped entry).

  Bidirectional (the paper's code): a second row of C reads a reverse scan of the same system,
  z_t = Lambda_bar z_{t+1} + B_bar u_t, and the two outputs are summed,
    y_t = factor * Re(C[0] x_t + C[1] z_t) + D u_t,
  so u_t enters both directions (unlike layers/s4d.py, whose anti-causal part sees only s > t).

  Modes of `__call__(x, *, segment_ids=None, cache=None) -> (y, cache)`:
    cache=None: the parallel scan (`linear_scan`, `scan_impl`), with or without segment_ids; a
      change of segment id drops the state (in both directions when bidirectional).
    cache given: streaming over the chunk (1 or more tokens), cache = {"state": complex64
      [batch, P'], "segment_id": int32 [batch]}; a chunk whose first id differs from the cached
      one starts from a zero state. Only for causal layers (bidirectional raises ValueError).
  The SSM computes in float32/complex64 (float64/complex128 only for float64 inputs under x64)
  whatever x's dtype; the output has x's dtype.
  With `seq_axis` (inside shard_map over that mesh axis, x one shard [batch, T, H] of the
  sequence; cache must be None): both scans run as `linear_scan_local` (the carried-in state from
  the shards before, or after for the reverse scan).
  """

  d_model: int
  d_state: int = 64
  blocks: int = 1
  c_init: str = "trunc_standard_normal"
  discretization: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  conj_sym: bool = True
  clip_eigs: bool = True
  bidirectional: bool = False
  step_rescale: float = 1.0
  dropout: float = 0.0
  deterministic: bool = True
  activation: str = "gelu"
  scan_impl: str = "auto"
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ("Lambda_re", "Lambda_im", "B", "log_dt")

  @property
  def n_modes(self) -> int:
    """P': the number of complex modes kept (the state width)."""
    return self.d_state // 2 if self.conj_sym else self.d_state

  def _check_fields(self) -> None:
    _check_sizes(self.d_state, self.blocks, "S5")
    if self.c_init not in C_INITS:
      raise ValueError(f"S5.c_init={self.c_init!r} is not one of {C_INITS}")
    if self.discretization not in DISCRETIZATIONS:
      raise ValueError(f"S5.discretization={self.discretization!r} is not one of "
                       f"{DISCRETIZATIONS}")
    if self.activation not in ssm_layer.ACTIVATIONS:
      raise ValueError(f"S5.activation={self.activation!r} is not one of {sorted(ssm_layer.ACTIVATIONS)}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"S5 needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max}")
    if not self.step_rescale > 0:
      raise ValueError(f"S5.step_rescale must be > 0, got {self.step_rescale}")

  def _check_streamable(self) -> None:
    ssm_layer.check_streamable("S5", self.bidirectional)

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Zero state; `dtype` is unused (the state is complex64 whatever the activation dtype)."""
    del dtype
    self._check_streamable()
    return {
        "state": jnp.zeros((batch_size, self.n_modes), jnp.complex64),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }

  def _ssm_params(self) -> tuple[Array, Array, Array, Array, Array]:
    """Lambda [P'], B [P', H], C [c, H, P'] (complex), dt [P'], D [H]; clip and rescale applied."""
    h, p_full, p = self.d_model, self.d_state, self.n_modes
    # Read by the initialisers only; cached, so apply() does not redo the eigendecomposition.
    lam0, v = _hippo_n_cached(self.d_state, self.blocks, self.conj_sym)  # [P'], [P, P']
    v_inv = v.conj().T  # V is unitary (S is normal), so V^{-1} = V^*: [P', P]
    lambda_re = self.param("Lambda_re", lambda _, s: jnp.asarray(lam0.real, jnp.float32), (p,))
    lambda_im = self.param("Lambda_im", lambda _, s: jnp.asarray(lam0.imag, jnp.float32), (p,))

    def b_init(key, shape):
      b0 = _truncated_normal(key, (p_full, h), 1.0 / p_full)
      return ssm_layer.pairs(jnp.asarray(v_inv) @ b0)

    c_rows = 2 if self.bidirectional else 1

    def c_init(key, shape):
      if self.c_init == "complex_normal":
        return jax.random.normal(key, shape, jnp.float32) * math.sqrt(0.5)
      variance = 1.0 / p_full if self.c_init == "trunc_standard_normal" else 1.0 / (p_full * h)
      c0 = ssm_layer.as_complex(_truncated_normal(key, (c_rows, h, p_full, 2), variance))
      return ssm_layer.pairs(c0 @ jnp.asarray(v, c0.dtype))

    b = self.param("B", b_init, (p, h, 2))
    c = self.param("C", c_init, (c_rows, h, p, 2))
    d = self.param("D", nn.initializers.normal(1.0), (h,), jnp.float32)
    log_dt = self.param("log_dt", ssm_layer.log_uniform(self.dt_min, self.dt_max), (p,), jnp.float32)
    if self.clip_eigs:
      lambda_re = jnp.minimum(lambda_re, MAX_EIG_REAL)
    lam = jax.lax.complex(lambda_re, lambda_im)
    return lam, ssm_layer.as_complex(b), ssm_layer.as_complex(c), self.step_rescale * jnp.exp(log_dt), d

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Array] | None = None) -> tuple[Array, Any]:
    self._check_fields()
    ssm_layer.check_input("S5", self.d_model, x)
    sequence_parallel.check_parallel_form("S5", self.seq_axis, cache)
    if cache is not None:
      self._check_streamable()
    batch, length, _ = x.shape
    lam, b, c, dt, d = self._ssm_params()
    u = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    lambda_bar, b_bar = s5_discretize(lam, b, dt, self.discretization)

    initial_state = None
    if cache is not None:
      segment_ids, same_doc = ssm_layer.stream_start(cache, segment_ids, (batch, length))
      initial_state = jnp.where(same_doc[:, None], cache["state"], 0).astype(jnp.complex64)
    y, final = s5_ssm(u, lambda_bar, b_bar, c, conj_sym=self.conj_sym,
                      initial_state=initial_state, segment_ids=segment_ids, impl=self.scan_impl,
                      seq_axis=self.seq_axis)
    new_cache = None
    if cache is not None:
      new_cache = {"state": final.astype(jnp.complex64), "segment_id": segment_ids[:, -1]}

    out = ssm_layer.output_stage(y, u, d, x.dtype, activation=self.activation,
                                 dropout=self.dropout, deterministic=self.deterministic)
    return out, new_cache
