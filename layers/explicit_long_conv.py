"""Simple long convolutions (Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions for
Sequence Modeling"): a kernel with one free parameter per tap, kept smooth and sparse by two
regularisers applied every time the kernel is used.

    k      = squash(smooth(K_param))                       K_param [c, max_length, H]
    squash(k) = sign(k) * max(|k| - lambda, 0)             (soft-thresholding)
    smooth    = average pooling over the taps, or a Gaussian average over the kernel's spectrum
    y      = out_proj(dropout(act(k * u + D u)))            * : causal (or two-sided) convolution

Shapes: x, y [batch, length, H]; the kernel is length-major, [.., taps, channels], as `fft_conv`
takes it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import long_conv, sequence_parallel
from layers.ssm_layer import ACTIVATIONS, check_input, check_streamable

Array = jax.Array


def squash(k: Array, lam: float) -> Array:
  """Soft-thresholding: sign(k) * max(|k| - lam, 0). Taps with |k| <= lam become exactly 0 (and
  get no gradient), the others move lam towards 0: the L1 proximal step, which makes the kernel
  sparse."""
  return jnp.sign(k) * jax.nn.relu(jnp.abs(k) - lam)


def smooth_average(k: Array, window: int) -> Array:
  """Moving average over the taps (axis -2) with zero padding:
  out[i] = (1/window) * sum_{|j| <= window//2} k[i + j], k[i + j] = 0 outside. window odd."""
  if window < 1 or window % 2 == 0:
    raise ValueError(f"smooth_average: window must be odd and >= 1, got {window}")
  half = window // 2
  padded = jnp.pad(k, [(0, 0)] * (k.ndim - 2) + [(half, half), (0, 0)])
  length = k.shape[-2]
  return sum(padded[..., j:j + length, :] for j in range(window)) / window


def smooth_frequency(k: Array, window: int) -> Array:
  """Gaussian moving average over the kernel's spectrum: with K = rfft(k) over the taps (axis -2),
  K'[f] = sum_{|j| <= window//2} g_j K[f + j] (K = 0 outside), g_j proportional to exp(-j^2 / 2) and
  summing to 1; returns irfft(K') at the kernel's length. Averaging neighbouring frequencies
  multiplies the kernel by a window concentrated at small lags, i.e. it damps long-range taps.
  (The weights are normalised here, unlike the reference code, so a flat spectrum is kept.)"""
  if window < 1 or window % 2 == 0:
    raise ValueError(f"smooth_frequency: window must be odd and >= 1, got {window}")
  half = window // 2
  g = np.exp(-0.5 * np.arange(-half, half + 1) ** 2)
  g = g / g.sum()
  length = k.shape[-2]
  spectrum = jnp.fft.rfft(k, axis=-2)
  n_freq = spectrum.shape[-2]
  padded = jnp.pad(spectrum, [(0, 0)] * (k.ndim - 2) + [(half, half), (0, 0)])
  smoothed = sum(g[j] * padded[..., j:j + n_freq, :] for j in range(window))
  return jnp.fft.irfft(smoothed, n=length, axis=-2).astype(k.dtype)


_SMOOTHERS = {"average": smooth_average, "frequency": smooth_frequency}


class LongConv(nn.Module):
  """Explicit long convolution layer (the mixer interface).

  Parameters:
    long_kernel [c, max_length, H] with c = num_kernels (x 2 when bidirectional: the first
                num_kernels causal, the rest anti-causal); normal * kernel_init_scale. In the SSM
                optimizer group (`ssm_param_names`): own learning rate, no weight decay.
    D           [num_kernels, H]  skip term, normal.
    out_proj    Dense(num_kernels * H -> 2H) followed by a GLU back to H.
  Each of the num_kernels kernels ("heads") convolves every channel of x; their outputs are
  concatenated before out_proj. The kernel used is kernel_dropout(squash(smooth(long_kernel))).

  __call__(x [batch, L, H], *, segment_ids=None, cache=None) -> (y [batch, L, H], cache):
    cache=None: the parallel form, by FFT (`fft_conv`), or with segment_ids by `direct_conv`
      restricted to each document. Needs L <= max_length (the kernel has max_length taps).
    cache given (causal layers only): streaming. The cache keeps the last max_length - 1 inputs
      and their segment ids ({"inputs": [batch, max_length-1, H], "segment_ids": [batch,
      max_length-1] int32, -1 where empty}); each new output is computed exactly from that
      history by `direct_conv`, costing O(max_length * num_kernels * H) per token. A convolution
      has no smaller state; memory is constant in the number of tokens streamed. Past max_length
      tokens the stream goes on as the finite filter it is (taps beyond max_length are zero).

  With `seq_axis` (inside shard_map over that mesh axis, x one shard [batch, T, H] of a sequence
  of L = n T tokens; parallel form only): an all-to-all switches to channel sharding, x ->
  [batch, L, H/n] (`sequence_to_channels`, H must divide by n); the convolution, D, activation
  and dropout run there with this shard's channels of the kernel (`channel_shard`) and the whole
  sequence's segment ids (`gather_sequence`); the inverse all-to-all brings [batch, L, c, H/n]
  back to [batch, T, c H] before out_proj. Needs L <= max_length.
  """

  d_model: int
  max_length: int = 1024
  num_kernels: int = 1
  bidirectional: bool = False
  squash_lambda: float = 1e-3
  smooth: str = "none"  # "none" | "average" | "frequency"
  smooth_window: int = 7
  kernel_init_scale: float = 2e-3
  kernel_dropout: float = 0.0
  dropout: float = 0.0
  activation: str = "gelu"
  block_size: int = 16  # query block of `direct_conv` (packed or streamed inputs)
  deterministic: bool = True
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ("long_kernel",)

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    check_streamable("LongConv", self.bidirectional)
    n = self.max_length - 1
    return {"inputs": jnp.zeros((batch_size, n, self.d_model), dtype),
            "segment_ids": jnp.full((batch_size, n), -1, jnp.int32)}

  def regularise(self, k: Array) -> Array:
    """The kernel used: kernel_dropout(squash(smooth(k))); k [c, max_length, H]."""
    if self.smooth != "none":
      if self.smooth not in _SMOOTHERS:
        raise ValueError(f"LongConv.smooth must be one of none, {', '.join(_SMOOTHERS)}; got "
                         f"{self.smooth!r}")
      k = _SMOOTHERS[self.smooth](k, self.smooth_window)
    k = squash(k, self.squash_lambda)
    if self.deterministic or self.kernel_dropout == 0:
      return k
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.kernel_dropout, k.shape)
    return jnp.where(keep, k / (1 - self.kernel_dropout), 0)

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array] | None]:
    check_input("LongConv", self.d_model, x)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"LongConv.activation must be one of {sorted(ACTIVATIONS)}; got "
                       f"{self.activation!r}")
    sequence_parallel.check_parallel_form("LongConv", self.seq_axis, cache)
    batch, length, h = x.shape
    c = self.num_kernels
    k = self.regularise(self.param(
        "long_kernel", nn.initializers.normal(self.kernel_init_scale),
        (c * (2 if self.bidirectional else 1), self.max_length, h), jnp.float32))
    D = self.param("D", nn.initializers.normal(1.0), (c, h), jnp.float32)
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32 compute (float64 for float64 x)
    u = x.astype(dtype)
    if self.seq_axis is not None:
      # Channel sharding: [batch, T, H] -> [batch, L, H/n], the whole sequence of this shard's
      # channels, with their slice of the kernel, D and the whole sequence's segment ids.
      u = sequence_parallel.sequence_to_channels(u, self.seq_axis)
      k = sequence_parallel.channel_shard(k, self.seq_axis)
      D = sequence_parallel.channel_shard(D, self.seq_axis)
      if segment_ids is not None:
        segment_ids = sequence_parallel.gather_sequence(segment_ids, self.seq_axis)
    length, hc = u.shape[1:]  # the whole length and the channels convolved here
    # Every kernel sees every channel: channel (i, j) of the convolution is kernel i on x[..., j].
    u = jnp.tile(u, (1, 1, c))                                           # [batch, L, c*hc]
    flat = lambda kk: kk.swapaxes(0, 1).reshape(kk.shape[1], c * hc)     # [c, T, hc] -> [T, c*hc]
    new_cache = None
    if cache is None:
      if length > self.max_length:
        raise ValueError(f"LongConv: sequence length {length} exceeds max_length "
                         f"{self.max_length} (the kernel's taps); raise LongConv.max_length")
      if self.bidirectional:
        kernel = long_conv.two_sided_kernel(flat(k[:c, :length]), flat(k[c:, :length]))
      else:
        kernel = flat(k[:, :length])
      if segment_ids is None:
        y = long_conv.fft_conv(u, kernel, causal=not self.bidirectional)
      else:
        y = long_conv.direct_conv(u, kernel, causal=not self.bidirectional,
                                  segment_ids=segment_ids, block_size=self.block_size)
    else:
      check_streamable("LongConv", self.bidirectional)
      if segment_ids is None:
        segment_ids = jnp.broadcast_to(cache["segment_ids"][:, -1:], (batch, length))
      y = long_conv.direct_conv(u, flat(k), segment_ids=segment_ids,
                                context=jnp.tile(cache["inputs"].astype(dtype), (1, 1, c)),
                                context_segment_ids=cache["segment_ids"],
                                block_size=self.block_size)
      new_cache = long_conv.keep_last(cache, x, segment_ids)
    y = y + D.reshape(c * hc) * u
    y = ACTIVATIONS[self.activation](y)
    y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
    if self.seq_axis is not None:
      # Back to length sharding before out_proj mixes the channels: [batch, L, c, H/n] ->
      # [batch, T, c, H], which keeps the channel order (i, j) of the unsharded layer.
      y = sequence_parallel.channels_to_sequence(y.reshape(batch, length, c, hc), self.seq_axis)
      y = y.reshape(batch, x.shape[1], c * h)
    z = nn.Dense(2 * h, dtype=x.dtype, name="out_proj")(y.astype(x.dtype))
    return (z[..., :h] * jax.nn.sigmoid(z[..., h:])).astype(x.dtype), new_cache

