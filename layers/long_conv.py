"""Long convolutions over the length axis: by FFT, and directly for packed or streamed inputs.

`fft_conv` is the shared primitive of the convolution-mode SSMs (S4, S4D) and the long-convolution
mixers (`layers.explicit_long_conv.LongConv`, `layers.hyena.Hyena`). `direct_conv` is the same
convolution restricted to documents (`segment_ids`) and continued from a history of earlier
inputs (streaming), where an FFT over the whole row cannot be used. Shapes: u [batch, length,
channels]; one filter per channel (depthwise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _fft_size(n: int) -> int:
  """Smallest power of two >= n (FFTs are fastest there on every backend)."""
  return 1 << max(0, (n - 1).bit_length())


def fft_conv(u: Array, k: Array, *, causal: bool = True, D: Array | None = None) -> Array:
  """Depthwise linear convolution along length by FFT, without wrap-around.

  u: [batch, length, channels]. k: [kernel_length, channels] (one filter shared by the batch) or
  [batch, kernel_length, channels] (a filter per example).

  causal=True:  y_t = sum_{0 <= s <= t} k_{t-s} u_s.  Taps of k beyond `length` never reach an
                output and are dropped, so kernel_length may be anything >= 1.
  causal=False: k has odd length 2M-1 (M <= length) and holds the offsets -(M-1)..(M-1):
                k[j] is the weight of offset o = j - (M-1), and
                y_t = sum_{0 <= s < length, |t-s| <= M-1} k[(t - s) + (M-1)] u_s.
                With M = length, k = [2*length-1, channels] covers every offset;
                `two_sided_kernel` builds it from a causal and an anti-causal kernel.
  D: optional skip term [channels]: y_t += D * u_t.

  Both are computed with FFTs zero-padded to a power of two >= 2*length, in float32 for float32,
  bfloat16 and float16 inputs (float64 for float64 ones); the result is returned in u's dtype.
  Returns [batch, length, channels].
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
  dtype = jnp.promote_types(jnp.promote_types(u.dtype, k.dtype), jnp.float32)
  uf = jnp.fft.rfft(u.astype(dtype), n=n, axis=-2)
  kf = jnp.fft.rfft(k.astype(dtype), n=n, axis=-2)
  y = jnp.fft.irfft(uf * kf, n=n, axis=-2)[..., shift:shift + length, :]
  if D is not None:
    y = y + D.astype(dtype) * u.astype(dtype)
  return y.astype(u.dtype)


def two_sided_kernel(k_causal: Array, k_anticausal: Array) -> Array:
  """The non-causal kernel of `fft_conv(..., causal=False)` made of two one-sided kernels.

  k_causal, k_anticausal: [M, channels]. Returns [2M-1, channels] holding
    y_t = sum_{0 <= t-s <= M-1} k_causal[t-s] u_s + sum_{1 <= s-t <= M-1} k_anticausal[s-t-1] u_s,
  i.e. k_causal weighs the present and the past, k_anticausal the strict future (its last tap,
  offset M, falls outside and is dropped). This is the bidirectional convention of the S4
  repository's layers (a causal kernel plus a flipped one shifted by one step).
  """
  if k_causal.shape != k_anticausal.shape or k_causal.ndim != 2:
    raise ValueError(f"two_sided_kernel: k_causal and k_anticausal must both be [M, channels], "
                     f"got {k_causal.shape} and {k_anticausal.shape}")
  m = k_causal.shape[0]
  # Offsets -(M-1)..-1 take k_anticausal[M-2]..k_anticausal[0]; offsets 0..M-1 take k_causal.
  return jnp.concatenate([k_anticausal[:m - 1][::-1], k_causal], axis=0)


def direct_conv(u: Array, k: Array, *, causal: bool = True, segment_ids: Array | None = None,
                context: Array | None = None, context_segment_ids: Array | None = None,
                block_size: int = 16) -> Array:
  """The convolution of `fft_conv`, computed directly, restricted to documents and able to see a
  history of earlier inputs: the form for packed sequences and for streaming.

  u: [batch, T, channels]; k as in `fft_conv` with a shared kernel ([klen, channels] causal, odd
  [2M-1, channels] non-causal); segment_ids: [batch, T] int. context: [batch, K, channels] inputs
  that precede u (a streaming history; causal only), with context_segment_ids [batch, K]. With
  x = concat(context, u) and sid = concat(context_segment_ids, segment_ids) (positions
  p = 0..K+T-1), the output at the position p = K + t of u's token t is

    causal:      y_t = sum_{0 <= p-q < klen}   k[p-q]       x_q [sid_q == sid_p]
    non-causal:  y_t = sum_{|p-q| <= M-1}      k[p-q + M-1] x_q [sid_q == sid_p]

  so no term crosses a document boundary (the segment ids of one document are contiguous and
  equal). Returns [batch, T, channels] in u's dtype, computed in float32 (float64 for float64).

  Cost: queries go in blocks of `block_size`; each block meets a window of klen + block_size - 1
  inputs (a Toeplitz tile of the kernel), so time is O(T * klen * channels) and the tile takes
  block_size * (klen + block_size) * channels floats: exact, but a direct convolution, not an
  FFT. For T <= block_size (a streamed token) it is one fused step of O(klen * channels).
  """
  if u.ndim != 3 or k.ndim != 2 or k.shape[-1] != u.shape[-1]:
    raise ValueError(f"direct_conv: u must be [batch, length, channels] and k [kernel_length, "
                     f"channels] with the same channels, got u {u.shape} and k {k.shape}")
  batch, length, channels = u.shape
  klen = k.shape[0]
  dtype = jnp.promote_types(jnp.promote_types(u.dtype, k.dtype), jnp.float32)
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, length), jnp.int32)
  if context is None:
    context = jnp.zeros((batch, 0, channels), dtype)
    context_segment_ids = jnp.zeros((batch, 0), jnp.int32)
  elif not causal:
    raise ValueError("direct_conv: context (a history of earlier inputs) needs causal=True")
  elif context_segment_ids is None or context_segment_ids.shape != context.shape[:2]:
    raise ValueError(f"direct_conv: context {context.shape} needs context_segment_ids "
                     f"[batch, {context.shape[1]}]")
  if causal:
    k = k[:context.shape[1] + length]  # longer taps reach no input
    klen = k.shape[0]
    lo, hi, k_shift = klen - 1, 0, 0
  else:
    if klen % 2 == 0:
      raise ValueError(f"direct_conv(causal=False): k must have odd length 2M-1, got {klen}")
    lo = hi = k_shift = (klen - 1) // 2
  n_ctx = context.shape[1]
  q = max(1, min(block_size, length))
  n_blocks = -(-length // q)
  pad_end = n_blocks * q - length
  # Sources: lo zeros (nothing reaches before the first input), the context, u, then zeros up to
  # the last block's window. Zero inputs contribute nothing, so their ids (-1) do not matter.
  x = jnp.concatenate([jnp.zeros((batch, lo, channels), dtype), context.astype(dtype),
                       u.astype(dtype), jnp.zeros((batch, pad_end + hi, channels), dtype)], axis=1)
  sid = jnp.concatenate([jnp.full((batch, lo), -1, jnp.int32),
                         context_segment_ids.astype(jnp.int32), segment_ids.astype(jnp.int32),
                         jnp.full((batch, pad_end + hi), -1, jnp.int32)], axis=1)
  q_sid = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad_end)), constant_values=-1)
  q_sid = q_sid.reshape(batch, n_blocks, q).swapaxes(0, 1)
  window = lo + q + hi
  # tile[a, w] weighs window input w for query a of a block: offset p - q = a + lo - w.
  taps = np.arange(q)[:, None] + lo - np.arange(window)[None, :] + k_shift
  valid = (taps >= 0) & (taps < klen)
  tile = jnp.where(valid[..., None], k.astype(dtype)[np.clip(taps, 0, klen - 1)], 0)

  def block(i_and_sid):
    i, block_sid = i_and_sid
    start = n_ctx + i * q  # the block's first query sits at x index lo + start
    xs = jax.lax.dynamic_slice_in_dim(x, start, window, axis=1)           # [batch, W, C]
    ss = jax.lax.dynamic_slice_in_dim(sid, start, window, axis=1)         # [batch, W]
    same = block_sid[:, :, None] == ss[:, None, :]                         # [batch, Q, W]
    return jnp.einsum("awc,baw,bwc->bac", tile, same.astype(dtype), xs)

  y = jax.lax.map(block, (jnp.arange(n_blocks), q_sid))                   # [n, batch, Q, C]
  y = y.swapaxes(0, 1).reshape(batch, n_blocks * q, channels)[:, :length]
  return y.astype(u.dtype)


def keep_last(cache: dict[str, Array], x: Array, segment_ids: Array) -> dict[str, Array]:
  """A streaming history after a chunk: the last K inputs and ids of concat(history, chunk).

  cache: {"inputs": [batch, K, ...], "segment_ids": [batch, K] int32}; x [batch, T, ...] (cast to
  the history's dtype); segment_ids [batch, T]. Returns a cache of the same shapes.
  """
  keep = cache["inputs"].shape[1]
  inputs = jnp.concatenate([cache["inputs"], x.astype(cache["inputs"].dtype)], axis=1)
  ids = jnp.concatenate([cache["segment_ids"], segment_ids.astype(jnp.int32)], axis=1)
  return {"inputs": inputs[:, inputs.shape[1] - keep:],
          "segment_ids": ids[:, ids.shape[1] - keep:]}
