"""S4D: diagonal state space layers (Gu, Gupta, Goel, Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models").

Per channel h (of H = d_model) the continuous system x'(t) = A x(t) + B u(t), y(t) = C x(t) has a
diagonal complex A with N/2 modes (N = d_state); the other N/2 are the complex conjugates, so
every output is 2 * Re(...) over the kept half. Zero-order-hold discretisation with step dt:
    dA = exp(dt * A),   dB = (exp(dt * A) - 1) / A * B,
    x_t = dA x_{t-1} + dB u_t,   y_t = 2 Re(C x_t) + D u_t,
which unrolls into the convolution y = K * u + D u with the Vandermonde kernel
    K[l, h] = 2 Re( sum_n C[h, n] dB[h, n] dA[h, n]^l ),   0 <= l < L.

Pure functions: `s4d_lin_init`, `s4d_inv_init`, `s4d_discretize`, `s4d_kernel`.
Module: `S4D`, with the three modes of the mixer interface (convolution, segmented recurrence,
streaming). Shapes: x [batch, length, d_model]; complex parameters are stored as real pairs
[..., 2] = (real, imag).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.long_conv import fft_conv
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


_A_INITS: dict[str, Callable[[int], np.ndarray]] = {"lin": s4d_lin_init, "inv": s4d_inv_init}


# --------------------------------------------------------------------------------------------
# Discretisation and kernel


def s4d_discretize(dt: Array, A: Array, B: Array) -> tuple[Array, Array]:
  """Zero-order hold. dt: [H] real; A, B: [H, N/2] complex.

  Returns dA = exp(dt A), dB = (exp(dt A) - 1) / A * B, both [H, N/2] complex.
  """
  dtA = dt[..., None] * A
  dA = jnp.exp(dtA)
  return dA, (dA - 1.0) / A * B


def s4d_kernel(dt: Array, A: Array, B: Array, C: Array, length: int, *,
               chunk_size: int | None = None) -> Array:
  """K[l, h] = 2 Re( sum_n C[h, n] dB[h, n] dA[h, n]^l ) for 0 <= l < length.

  dt: [H]; A, B: [H, N/2] complex; C: [H, N/2] or [channels, H, N/2] complex.
  Returns [length, H] (or [channels, length, H]) in the real dtype matching A's precision.
  dA^l is formed as exp(l * dt * A), the Vandermonde matrix [H, N/2, chunk]; with chunk_size
  the length axis is processed chunk by chunk so no more than [H, N/2, chunk_size] is held.
  """
  if length < 1:
    raise ValueError(f"s4d_kernel: length must be >= 1, got {length}")
  _, dB = s4d_discretize(dt, A, B)
  dtA = dt[..., None] * A
  cdb = C * dB  # [..., H, N/2]
  real_dtype = jnp.real(cdb).dtype

  def block(positions):  # positions: [n] -> [..., n, H]
    vander = jnp.exp(dtA[..., None] * positions.astype(real_dtype))  # [H, N/2, n]
    return 2.0 * jnp.real(jnp.einsum("...hn,hnl->...lh", cdb, vander))

  if chunk_size is None or chunk_size >= length:
    return block(jnp.arange(length))
  if chunk_size < 1:
    raise ValueError(f"s4d_kernel: chunk_size must be >= 1, got {chunk_size}")
  num_chunks = -(-length // chunk_size)
  starts = jnp.arange(num_chunks) * chunk_size
  chunks = jax.lax.map(lambda s: block(s + jnp.arange(chunk_size)), starts)  # [c, ..., n, H]
  chunks = jnp.moveaxis(chunks, 0, -3)  # [..., c, n, H]
  k = chunks.reshape(chunks.shape[:-3] + (num_chunks * chunk_size, chunks.shape[-1]))
  return k[..., :length, :]


# --------------------------------------------------------------------------------------------
# Module

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # The S4 repository uses torch.nn.GELU, i.e. the exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def _log_uniform(lo: float, hi: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi))
  return init


def _complex_normal(key, shape, dtype=jnp.float32):
  """Real pairs [..., 2] of a complex normal with E|z|^2 = 1 (like torch.randn(cfloat))."""
  return jax.random.normal(key, shape, dtype) * math.sqrt(0.5)


def _as_complex(p: Array) -> Array:
  return jax.lax.complex(p[..., 0], p[..., 1])


class S4D(nn.Module):
  """The S4D layer: y = out_proj(dropout(act(ssm(x) + D * x))), out_proj = Dense(2 d_model) + GLU.

  x: [batch, length, d_model] -> [batch, length, d_model]. One SSM per channel (H = d_model) with
  N/2 = d_state/2 complex modes. GLU(z) = z[..., :H] * sigmoid(z[..., H:]) as in the S4 repo.

  Parameters (complex ones as real pairs [..., 2]):
    log_dt [H]            log-uniform in [dt_min, dt_max]
    log_A_real [H, N/2]   A.real = -exp(log_A_real), starts at -1/2
    A_imag [H, N/2]       S4D-Lin or S4D-Inv imaginary parts (`a_init`)
    B [H, N/2, 2]         starts at 1
    C [c, H, N/2, 2]      complex normal; c = 2 if bidirectional else 1
    D [H]                 standard normal
  Bidirectional: the second C row gives an anti-causal kernel that shares A, B and dt with the
  causal one and sees strictly future inputs (as in the S4 repo):
    y_t = sum_{s<=t} K0[t-s] u_s + sum_{s>t} K1[s-t-1] u_s + D u_t.

  Modes of `__call__(x, *, segment_ids=None, cache=None) -> (y, cache)`:
    cache=None, segment_ids=None: convolution mode, kernel + `fft_conv`.
    cache=None, segment_ids given: the recurrence through `linear_scan` (complex64 state); a change
      of segment id drops the state (a reverse scan for the bidirectional part, same resets).
    cache given: streaming over the chunk, cache = {"state": complex64 [batch, H, N/2],
      "segment_id": int32 [batch]}; a chunk whose first id differs from the cached one starts
      from a zero state. Only for causal layers.
  The SSM computes in float32 (complex64) whatever x's dtype; the output has x's dtype.

  Fields besides the shapes: a_init "lin" | "inv" (S4D-Lin / S4D-Inv; the field cannot be called
  `init`, which is flax's Module.init), scan_impl (passed to `linear_scan`), kernel_chunk_size
  (None, or the length chunk of `s4d_kernel` to bound memory for long sequences).
  """

  d_model: int
  d_state: int = 64
  # Not `init`: that name is flax.linen.Module.init.
  a_init: str = "lin"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  bidirectional: bool = False
  dropout: float = 0.0
  deterministic: bool = True
  activation: str = "gelu"
  scan_impl: str = "auto"
  kernel_chunk_size: int | None = None

  ssm_param_names = ("log_dt", "log_A_real", "A_imag", "B")

  def _check_fields(self) -> None:
    _check_d_state(self.d_state)
    if self.a_init not in _A_INITS:
      raise ValueError(f"S4D.a_init={self.a_init!r} is not one of {sorted(_A_INITS)}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"S4D.activation={self.activation!r} is not one of {sorted(_ACTIVATIONS)}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"S4D needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max}")

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Zero state; `dtype` is unused (the state is complex64 whatever the activation dtype)."""
    del dtype
    self._check_streamable()
    return {
        "state": jnp.zeros((batch_size, self.d_model, self.d_state // 2), jnp.complex64),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }

  def _check_streamable(self) -> None:
    if self.bidirectional:
      raise ValueError("S4D(bidirectional=True) cannot stream: streaming (cache=...) needs a "
                       "causal layer (bidirectional=False)")

  def _ssm_params(self) -> tuple[Array, Array, Array, Array, Array]:
    """dt [H], A [H, N/2], B [H, N/2], C [c, H, N/2] (complex64), D [H]."""
    h, n2 = self.d_model, self.d_state // 2
    a_imag0 = np.imag(_A_INITS[self.a_init](self.d_state))
    log_dt = self.param("log_dt", _log_uniform(self.dt_min, self.dt_max), (h,), jnp.float32)
    log_a_real = self.param("log_A_real", nn.initializers.constant(math.log(0.5)), (h, n2),
                            jnp.float32)
    a_imag = self.param("A_imag", lambda _, s, d=jnp.float32: jnp.broadcast_to(
        jnp.asarray(a_imag0, d), s), (h, n2), jnp.float32)
    b = self.param("B", lambda _, s, d=jnp.float32: jnp.zeros(s, d).at[..., 0].set(1.0),
                   (h, n2, 2), jnp.float32)
    c = self.param("C", _complex_normal, (2 if self.bidirectional else 1, h, n2, 2), jnp.float32)
    d = self.param("D", nn.initializers.normal(1.0), (h,), jnp.float32)
    A = jax.lax.complex(-jnp.exp(log_a_real), a_imag)
    return jnp.exp(log_dt), A, _as_complex(b), _as_complex(c), d

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Array] | None = None) -> tuple[Array, Any]:
    self._check_fields()
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"S4D(d_model={self.d_model}) needs x [batch, length, {self.d_model}], "
                       f"got {x.shape}")
    if cache is not None:
      self._check_streamable()
    batch, length, _ = x.shape
    dt, A, B, C, D = self._ssm_params()
    u = x.astype(jnp.float32)

    new_cache = None
    if cache is None and segment_ids is None:
      k = s4d_kernel(dt, A, B, C, length, chunk_size=self.kernel_chunk_size)  # [c, L, H]
      if self.bidirectional:
        # Offsets -(L-1)..-1 take K1[L-2]..K1[0]; offsets 0..L-1 take K0.
        k_full = jnp.concatenate([k[1, :length - 1][::-1], k[0]], axis=0)
        y = fft_conv(u, k_full, causal=False)
      else:
        y = fft_conv(u, k[0], causal=True)
    else:
      dA, dB = s4d_discretize(dt, A, B)  # [H, N/2]
      a = dA[None, None]  # [1, 1, H, N/2], broadcast by the scan over batch and length
      b = dB * u[..., None].astype(jnp.complex64)  # [batch, L, H, N/2]
      initial_state = None
      if cache is not None:
        if segment_ids is None:
          segment_ids = jnp.broadcast_to(cache["segment_id"][:, None], (batch, length))
        segment_ids = segment_ids.astype(jnp.int32)
        same_doc = (segment_ids[:, 0] == cache["segment_id"])[:, None, None]
        initial_state = jnp.where(same_doc, cache["state"], 0).astype(jnp.complex64)
      hs, final = linear_scan(a, b, initial_state=initial_state, segment_ids=segment_ids,
                              impl=self.scan_impl)
      y = 2.0 * jnp.real(jnp.einsum("blhn,hn->blh", hs, C[0]))
      if self.bidirectional:
        hb, _ = linear_scan(a, b, segment_ids=segment_ids, reverse=True, impl=self.scan_impl)
        # The anti-causal part at t reads the backward state of t+1 (strictly future inputs),
        # which is dropped when t+1 starts another document.
        nxt = jnp.concatenate([hb[:, 1:], jnp.zeros_like(hb[:, :1])], axis=1)
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                                jnp.zeros((batch, 1), bool)], axis=1)
        nxt = jnp.where(same[..., None, None], nxt, 0)
        y = y + 2.0 * jnp.real(jnp.einsum("blhn,hn->blh", nxt, C[1]))
      if cache is not None:
        new_cache = {"state": final.astype(jnp.complex64), "segment_id": segment_ids[:, -1]}

    y = y + D * u
    y = _ACTIVATIONS[self.activation](y)
    y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
    z = nn.Dense(2 * self.d_model, dtype=x.dtype, name="out_proj")(y.astype(x.dtype))
    out = z[..., :self.d_model] * jax.nn.sigmoid(z[..., self.d_model:])
    return out.astype(x.dtype), new_cache
