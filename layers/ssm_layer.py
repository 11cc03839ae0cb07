"""The shell shared by the S4-family layers (S4, S4D, S5): initialisers of complex parameters
stored as real pairs, the convolution by a (possibly bidirectional) kernel, the start of a streamed
chunk, and the output stage

    y = out_proj(dropout(act(ssm(u) + D * u))),   out_proj(z) = GLU(Dense(2H)(z)),
    GLU(z) = z[..., :H] * sigmoid(z[..., H:])      (as the S4 repository's layers).

Shapes: u, y [batch, length, H]; complex parameters are stored as real pairs [..., 2] = (re, im).

Sequence parallelism (the layers' `seq_axis`, see `layers.sequence_parallel`): the convolution
mode switches to channel sharding (`convolve_sequence_parallel`), the recurrences scan their shard
and add the state carried in from the other shards.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import sequence_parallel
from layers.long_conv import fft_conv, two_sided_kernel

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # The S4 repository uses torch.nn.GELU, i.e. the exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def log_uniform(lo: float, hi: float):
  """Initialiser of log(dt) with dt log-uniform in [lo, hi]."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi))
  return init


def complex_normal(key, shape, dtype=jnp.float32):
  """Real pairs [..., 2] of a complex normal with E|z|^2 = 1 (like torch.randn(cfloat))."""
  return jax.random.normal(key, shape, dtype) * math.sqrt(0.5)


def constant(value):
  """Initialiser broadcasting a fixed array (float64 numpy keeps its digits for float64 params)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)
  return init


def pairs(z):
  """complex [...] -> real pairs [..., 2]; numpy in, numpy out (float64 kept), else jax."""
  xp = np if isinstance(z, np.ndarray) else jnp
  return xp.stack([xp.real(z), xp.imag(z)], axis=-1)


def as_complex(p: Array) -> Array:
  """Real pairs [..., 2] -> complex [...]."""
  return jax.lax.complex(p[..., 0], p[..., 1])


def convolve(u: Array, k: Array, *, bidirectional: bool) -> Array:
  """y = K0 * u (causal), plus the anti-causal K1 on strictly future inputs when bidirectional:
  y_t = sum_{s<=t} K0[t-s] u_s + sum_{s>t} K1[s-t-1] u_s.  u [batch, L, H]; k [c, L, H]."""
  if not bidirectional:
    return fft_conv(u, k[0], causal=True)
  length = u.shape[1]
  return fft_conv(u, two_sided_kernel(k[0, :length], k[1, :length]), causal=False)


def convolve_sequence_parallel(u: Array, kernel: Callable[[int], Array], *, bidirectional: bool,
                               axis: str) -> Array:
  """`convolve` on one shard of the sequence, u [batch, T, H] (positions [i T, (i + 1) T) of
  L = n T), by channel sharding: u -> all-to-all -> [batch, L, H/n] -> y = K * u with this shard's
  kernel(L) [c, L, H/n] (channels [i H/n, (i + 1) H/n), see `sequence_parallel.channel_shard`)
  -> all-to-all back -> y [batch, T, H]. The D skip and the output stage stay outside (they need
  no other position; out_proj mixes all channels)."""
  uc = sequence_parallel.sequence_to_channels(u, axis)
  y = convolve(uc, kernel(uc.shape[1]), bidirectional=bidirectional)
  return sequence_parallel.channels_to_sequence(y, axis)


def check_input(layer: str, d_model: int, x: Array) -> None:
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"{layer}(d_model={d_model}) needs x [batch, length, {d_model}], got {x.shape}")


def check_streamable(layer: str, bidirectional: bool) -> None:
  if bidirectional:
    raise ValueError(f"{layer}(bidirectional=True) cannot stream: streaming (cache=...) needs a "
                     "causal layer (bidirectional=False)")


def stream_start(cache: Mapping[str, Array], segment_ids: Array | None,
                 shape: tuple[int, int]) -> tuple[Array, Array]:
  """Segment ids of a streamed chunk ([batch, length]: the cached id when none are given) and
  whether each row continues the cached document ([batch] bool; False: start from a zero state)."""
  if segment_ids is None:
    segment_ids = jnp.broadcast_to(cache["segment_id"][:, None], shape)
  segment_ids = segment_ids.astype(jnp.int32)
  return segment_ids, segment_ids[:, 0] == cache["segment_id"]


def output_stage(y: Array, u: Array, D: Array, x_dtype, *, activation: str, dropout: float,
                 deterministic: bool) -> Array:
  """act(y + D u) -> dropout -> Dense(2H) + GLU, in x's dtype. Call inside the layer's compact
  `__call__`: the Dense is created there, as the layer's submodule "out_proj"."""
  h = u.shape[-1]
  y = ACTIVATIONS[activation](y + D.astype(u.dtype) * u)
  y = nn.Dropout(dropout, deterministic=deterministic)(y)
  z = nn.Dense(2 * h, dtype=x_dtype, name="out_proj")(y.astype(x_dtype))
  return (z[..., :h] * jax.nn.sigmoid(z[..., h:])).astype(x_dtype)
