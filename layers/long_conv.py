"""Long convolutions over the length axis, computed with the FFT.

`fft_conv` is the shared primitive of the convolution-mode SSMs (S4, S4D) and the long-convolution
mixers. Shapes: u [batch, length, channels]; one filter per channel (depthwise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _fft_size(n: int) -> int:
  """Smallest power of two >= n (FFTs are fastest there on every backend)."""
  return 1 << max(0, (n - 1).bit_length())


def fft_conv(u: Array, k: Array, *, causal: bool = True) -> Array:
  """Depthwise linear convolution along length by FFT, without wrap-around.

  u: [batch, length, channels]. k: [kernel_length, channels] (one filter shared by the batch) or
  [batch, kernel_length, channels] (a filter per example).

  causal=True:  y_t = sum_{0 <= s <= t} k_{t-s} u_s.  Taps of k beyond `length` never reach an
                output and are dropped, so kernel_length may be anything >= 1.
  causal=False: k has odd length 2M-1 (M <= length) and holds the offsets -(M-1)..(M-1):
                k[j] is the weight of offset o = j - (M-1), and
                y_t = sum_{0 <= s < length, |t-s| <= M-1} k[(t - s) + (M-1)] u_s.
                With M = length, k = [2*length-1, channels] covers every offset.

  Both are computed with FFTs zero-padded to a power of two >= 2*length, in float32 whatever the
  input dtype; the result is returned in u's dtype. Returns [batch, length, channels].
  """
  if u.ndim != 3:
    raise ValueError(f"fft_conv: u must be [batch, length, channels], got shape {u.shape}")
  if k.ndim not in (2, 3):
    raise ValueError(f"fft_conv: k must be [kernel_length, channels] or "
                     f"[batch, kernel_length, channels], got shape {k.shape}")
  length = u.shape[1]
  if k.shape[-1] != u.shape[-1]:
    raise ValueError(f"fft_conv: k has {k.shape[-1]} channels but u has {u.shape[-1]} "
                     f"(u {u.shape}, k {k.shape})")
  if k.ndim == 3 and k.shape[0] != u.shape[0]:
    raise ValueError(f"fft_conv: batched k has batch {k.shape[0]} but u has {u.shape[0]}")
  klen = k.shape[-2]
  if causal:
    k = k[..., :length, :]
    shift = 0
  else:
    if klen % 2 == 0 or (klen + 1) // 2 > length:
      raise ValueError(f"fft_conv(causal=False): k must have odd length 2M-1 with M <= length "
                       f"({length}), got kernel_length {klen}")
    # Output t sits at index t + (M-1) of the full linear convolution.
    shift = (klen - 1) // 2
  n = _fft_size(2 * length)
  uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=-2)
  kf = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=-2)
  y = jnp.fft.irfft(uf * kf, n=n, axis=-2)[..., shift:shift + length, :]
  return y.astype(u.dtype)
