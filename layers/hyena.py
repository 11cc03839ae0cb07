"""Hyena (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models"): long
convolutions with implicitly parametrised filters, interleaved with multiplicative gates.

The operator of order N (Definition 3.1 of the paper), on x [batch, L, D]:

    (x^1, ..., x^N, v) = ShortConv(in_proj(x))             N + 1 streams of width D
    z^1 = v
    z^{n+1} = x^n * (h^n conv z^n + b^n * z^n)              n = 1..N   (* : elementwise gate)
    y = out_proj(z^{N+1})

Each filter is h^n_t = window(t) * FFN(PE(t)) for taps t = 0..max_length-1: a positional encoding
PE(t) = [t / (max_length-1), cos(f_i w_t), -sin(f_i w_t)]_i with w_t = 2 pi t / max_length and
f_i = linspace(1e-4, B-1, B), B = (emb_dim - 1) / 2 bands; an FFN with sine activations
sin(a * z) of learnable frequency a; and an exponential-decay window
exp(-|delta_d| t / (max_length - 1)) whose rate delta_d is spread over the channels (fast to slow).
All filter parameters (FFN, frequencies, b) live in the submodule "implicit_filter", tagged for
the SSM optimizer group (own learning rate, no weight decay).

Shapes: x, y [batch, length, d_model]; filters [taps, N, d_model].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import long_conv, sequence_parallel
from layers.blocks import ShortConv

Array = jax.Array


def positional_encoding(length: int, max_length: int, emb_dim: int) -> np.ndarray:
  """[length, emb_dim] float32: PE(t) for t = 0..length-1 on the grid of max_length taps (so a tap
  has the same encoding whatever the sequence length). emb_dim odd >= 3."""
  if emb_dim < 3 or emb_dim % 2 == 0:
    raise ValueError(f"Hyena: emb_dim must be odd and >= 3 (time plus cos/sin bands), got "
                     f"{emb_dim}")
  bands = (emb_dim - 1) // 2
  t = np.arange(length, dtype=np.float64)
  t_norm = t / max(max_length - 1, 1)
  f = np.linspace(1e-4, bands - 1, bands)
  angle = f[None, :] * (2 * math.pi * t[:, None] / max_length)
  return np.concatenate([t_norm[:, None], np.cos(angle), -np.sin(angle)], -1).astype(np.float32)


def decay_window(length: int, max_length: int, channels: int, *, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2) -> np.ndarray:
  """[length, channels] float32: exp(-|delta_c| t / (max_length - 1)), with delta_c evenly spaced
  from log(target) / fast_decay_pct to log(target) / slow_decay_pct: channel 0 decays to `target`
  after fast_decay_pct of the taps, the last channel after slow_decay_pct of them."""
  t = np.arange(length, dtype=np.float64)[:, None] / max(max_length - 1, 1)
  delta = np.linspace(math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct,
                      channels)
  return np.exp(-np.abs(delta)[None, :] * t).astype(np.float32)


class Sine(nn.Module):
  """sin(a * z) with a learnable frequency a per feature (initialised to `freq`)."""

  freq: float = 1.0

  @nn.compact
  def __call__(self, z: Array) -> Array:
    a = self.param("freq", nn.initializers.constant(self.freq), (z.shape[-1],), jnp.float32)
    return jnp.sin(a * z)


class ImplicitFilter(nn.Module):
  """The N Hyena filters h^n [taps, N, D] and their skip terms b [N, D] (module docstring)."""

  d_model: int
  order: int
  max_length: int
  emb_dim: int = 3
  filter_order: int = 64
  num_inner_mlps: int = 2
  sine_freq: float = 1.0
  modulate: bool = True

  @nn.compact
  def __call__(self, length: int) -> tuple[Array, Array]:
    z = jnp.asarray(positional_encoding(length, self.max_length, self.emb_dim))
    for i in range(self.num_inner_mlps + 1):
      z = Sine(self.sine_freq, name=f"sine_{i}")(nn.Dense(self.filter_order, name=f"dense_{i}")(z))
    h = nn.Dense(self.order * self.d_model, use_bias=False, name="dense_out")(z)
    if self.modulate:
      h = h * decay_window(length, self.max_length, self.order * self.d_model)
    bias = self.param("bias", nn.initializers.normal(1.0), (self.order, self.d_model), jnp.float32)
    return h.reshape(length, self.order, self.d_model), bias


class Hyena(nn.Module):
  """The Hyena operator as a mixer (causal).

  __call__(x [batch, L, d_model], *, segment_ids=None, cache=None) -> (y, cache):
    cache=None: the parallel form: the filters at L taps, each long convolution by FFT
      (`fft_conv`), or with segment_ids by `direct_conv` restricted to each document (the short
      convolution resets there too). Needs L <= max_length.
    cache given: streaming. The cache holds the short convolution's cache and the inputs z^n of
      the N long convolutions over the last max_length - 1 tokens ({"short_conv": ...,
      "inputs": [batch, max_length-1, N, d_model], "segment_ids": [batch, max_length-1]}, ids
      -1 where empty); each output is exact, at O(max_length * N * d_model) per token. Memory is
      constant in the number of tokens streamed; past max_length the filters, which have
      max_length taps, act as the finite filters they are.
  Projections compute in x's dtype; the convolutions in float32.

  With `seq_axis` (inside shard_map over that mesh axis, x one shard [batch, T, D] of a sequence
  of L = n T tokens; parallel form only): in_proj and the short convolution (its first inputs from
  the left neighbour) run on the shard; one all-to-all switches the N + 1 streams to channel
  sharding, [batch, L, N + 1, D/n] (`sequence_to_channels`, D must divide by n); the whole
  order-N recurrence runs there, as its gates are per channel, with this shard's channels of the
  filters computed at L taps (`channel_shard`) and the whole sequence's segment ids
  (`gather_sequence`); one inverse all-to-all brings z^{N+1} back before out_proj. Needs
  L <= max_length.
  """

  d_model: int
  max_length: int = 1024
  order: int = 2
  filter_order: int = 64
  emb_dim: int = 3
  num_inner_mlps: int = 2
  sine_freq: float = 1.0
  modulate: bool = True
  short_conv_size: int = 3
  dropout: float = 0.0
  block_size: int = 16  # query block of `direct_conv` (packed or streamed inputs)
  deterministic: bool = True
  seq_axis: str | None = None  # sequence parallelism: see layers.sequence_parallel

  ssm_param_names = ("implicit_filter",)

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    n = self.max_length - 1
    conv = ShortConv(self.short_conv_size, d_model=(self.order + 1) * self.d_model, parent=None)
    return {"short_conv": conv.init_cache(batch_size, dtype),
            "inputs": jnp.zeros((batch_size, n, self.order, self.d_model), jnp.float32),
            "segment_ids": jnp.full((batch_size, n), -1, jnp.int32)}

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: dict[str, Any] | None = None) -> tuple[Array, dict[str, Any] | None]:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"Hyena(d_model={self.d_model}) needs x [batch, length, {self.d_model}], "
                       f"got {x.shape}")
    if self.order < 1:
      raise ValueError(f"Hyena.order must be >= 1, got {self.order}")
    sequence_parallel.check_parallel_form("Hyena", self.seq_axis, cache)
    batch, length, d = x.shape
    if self.seq_axis is not None:
      length *= sequence_parallel.axis_size(self.seq_axis)  # the whole sequence's length
    if cache is None and length > self.max_length:
      raise ValueError(f"Hyena: sequence length {length} exceeds max_length {self.max_length} "
                       f"(the filters' taps); raise Hyena.max_length")
    if cache is not None and segment_ids is None:
      segment_ids = jnp.broadcast_to(cache["segment_ids"][:, -1:], (batch, length))
    u = nn.Dense((self.order + 1) * d, dtype=x.dtype, name="in_proj")(x)
    u, conv_cache = ShortConv(self.short_conv_size, d_model=(self.order + 1) * d,
                              seq_axis=self.seq_axis, name="short_conv")(
        u, segment_ids=segment_ids, cache=None if cache is None else cache["short_conv"])
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32 compute (float64 for float64 x)
    streams = u.astype(dtype).reshape(batch, x.shape[1], self.order + 1, d)
    taps = length if cache is None else self.max_length
    h, bias = ImplicitFilter(d, self.order, self.max_length, self.emb_dim, self.filter_order,
                             self.num_inner_mlps, self.sine_freq, self.modulate,
                             name="implicit_filter")(taps)
    if self.seq_axis is not None:
      # Channel sharding for the whole recurrence: [batch, T, N+1, D] -> [batch, L, N+1, D/n].
      streams = sequence_parallel.sequence_to_channels(streams, self.seq_axis)
      h = sequence_parallel.channel_shard(h, self.seq_axis)
      bias = sequence_parallel.channel_shard(bias, self.seq_axis)
      if segment_ids is not None:
        segment_ids = sequence_parallel.gather_sequence(segment_ids, self.seq_axis)
    drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
    z = streams[:, :, self.order]  # v
    conv_inputs = []
    for n in range(self.order):
      conv_inputs.append(z)
      if cache is not None:
        hz = long_conv.direct_conv(z, h[:, n], segment_ids=segment_ids,
                                   context=cache["inputs"][:, :, n],
                                   context_segment_ids=cache["segment_ids"],
                                   block_size=self.block_size)
      elif segment_ids is not None:
        hz = long_conv.direct_conv(z, h[:, n], segment_ids=segment_ids, block_size=self.block_size)
      else:
        hz = long_conv.fft_conv(z, h[:, n])
      z = drop(streams[:, :, n] * (hz + bias[n] * z))
    if self.seq_axis is not None:
      z = sequence_parallel.channels_to_sequence(z, self.seq_axis)  # [batch, T, D]
    y = nn.Dense(d, dtype=x.dtype, name="out_proj")(z.astype(x.dtype))
    new_cache = None
    if cache is not None:
      history = long_conv.keep_last(
          {"inputs": cache["inputs"], "segment_ids": cache["segment_ids"]},
          jnp.stack(conv_inputs, axis=2), segment_ids)
      new_cache = {"short_conv": conv_cache, **history}
    return y.astype(x.dtype), new_cache
