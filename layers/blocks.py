"""Building blocks shared by the mixers: norms, the gated MLP, the short causal convolution, rotary
position embeddings, the residual block and the mixer registry.

Shapes: activations are `[batch, length, d_model]` unless stated otherwise. Norms compute in
float32 and return the input dtype; projections compute in the activation dtype with float32
parameters.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import sequence_parallel

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2, -1) + eps) * scale, over the last axis; `scale` starts at 1."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


class LayerNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias, over the last axis (biased variance)."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(x.dtype)


_NORMS: dict[str, type[nn.Module]] = {"layer": LayerNorm, "rms": RMSNorm}


# --------------------------------------------------------------------------------------------
# Gated MLP

_GATE_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "swiglu": jax.nn.silu,
    # GeGLU (Shazeer 2020) uses the exact (erf) GELU.
    "geglu": lambda x: jax.nn.gelu(x, approximate=False),
}


class GatedMLP(nn.Module):
  """out = W2 (dropout(act(W1 x) * W3 x)); act = SiLU for "swiglu", GELU for "geglu".

  x: [..., d] -> [..., d]; W1, W3: d -> hidden_dim, W2: hidden_dim -> d, no biases.
  """

  hidden_dim: int
  activation: str = "swiglu"
  dropout: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.activation not in _GATE_ACTIVATIONS:
      raise ValueError(
          f"GatedMLP.activation={self.activation!r} is not one of {sorted(_GATE_ACTIVATIONS)}")
    act = _GATE_ACTIVATIONS[self.activation]
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=x.dtype, name=name)
    h = act(dense(self.hidden_dim, "w1")(x)) * dense(self.hidden_dim, "w3")(x)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    return dense(x.shape[-1], "w2")(h)


# --------------------------------------------------------------------------------------------
# Short causal convolution


class ShortConv(nn.Module):
  """Causal depthwise convolution over length: [batch, length, channels] -> same shape.

  y_t = bias + sum_{k=0}^{K-1} kernel[k] * x_{t-(K-1)+k}   (K = kernel_size; kernel [K, channels]),
  i.e. `kernel[K-1]` weighs the current token (the PyTorch `Conv1d` layout, so Mamba / Hyena
  weights load without flipping). Inputs before the sequence start are zero. With `segment_ids`
  a tap x_s contributes to y_t only if segment_ids[s] == segment_ids[t].

  Mixer-style call: `__call__(x, *, segment_ids=None, cache=None) -> (y, cache)`. The cache is
  {"inputs": [batch, K-1, channels] (the last K-1 inputs, zeroed where they belong to an earlier
  document than the last one), "segment_id": [batch] int32 (the last segment id seen; -1 for a
  fresh cache)}. `d_model` (channels) is only needed by `init_cache`; if given, x must match.
  With `seq_axis` (see `layers.sequence_parallel`) x is one shard of the sequence and the K-1
  inputs before it come from the shards to its left.
  """

  kernel_size: int = 4
  use_bias: bool = True
  d_model: int | None = None
  seq_axis: str | None = None

  ssm_param_names = ()

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32, *,
                 channels: int | None = None) -> dict[str, Array]:
    channels = self.d_model if channels is None else channels
    if channels is None:
      raise ValueError("ShortConv.init_cache needs the channel count: set ShortConv.d_model "
                       "or pass channels=")
    return {
        "inputs": jnp.zeros((batch_size, self.kernel_size - 1, channels), dtype),
        "segment_id": jnp.full((batch_size,), -1, jnp.int32),
    }

  @nn.compact
  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Mapping[str, Array] | None = None) -> tuple[Array, Any]:
    if self.kernel_size < 1:
      raise ValueError(f"ShortConv.kernel_size must be >= 1, got {self.kernel_size}")
    batch, length, channels = x.shape
    if self.d_model is not None and channels != self.d_model:
      raise ValueError(f"ShortConv(d_model={self.d_model}) got x with {channels} channels")
    km1 = self.kernel_size - 1
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, channels),
                        jnp.float32)

    streaming = cache is not None
    sequence_parallel.check_parallel_form("ShortConv", self.seq_axis, cache)
    # past [batch, K-1, channels]: the inputs before x; past_ids [batch, K-1] their documents.
    if streaming:
      past = cache["inputs"]
      if past.shape != (batch, km1, channels):
        raise ValueError(f"ShortConv cache['inputs'] has shape {past.shape}, expected "
                         f"{(batch, km1, channels)}")
      past_ids = jnp.broadcast_to(cache["segment_id"][:, None], (batch, km1))
      if segment_ids is None:
        segment_ids = jnp.broadcast_to(cache["segment_id"][:, None], (batch, length))
    elif self.seq_axis is not None:
      past = sequence_parallel.from_previous_shards(x, km1, self.seq_axis)
      past_ids = (None if segment_ids is None else sequence_parallel.from_previous_shards(
          segment_ids.astype(jnp.int32), km1, self.seq_axis, fill=-1))
    else:
      past = jnp.zeros((batch, km1, channels), x.dtype)
      past_ids = jnp.full((batch, km1), -1, jnp.int32)
    xp = jnp.concatenate([past.astype(x.dtype), x], axis=1)  # [batch, K-1+length, channels]

    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 for float64 x
    xf = xp.astype(compute_dtype)
    y = jnp.zeros((batch, length, channels), compute_dtype)
    if segment_ids is not None:
      segment_ids = segment_ids.astype(jnp.int32)
      sp = jnp.concatenate([past_ids, segment_ids], 1)
    for k in range(self.kernel_size):
      tap = xf[:, k:k + length]
      if segment_ids is not None:
        tap = jnp.where((sp[:, k:k + length] == segment_ids)[..., None], tap, 0.0)
      y = y + kernel[k] * tap
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    y = y.astype(x.dtype)

    if not streaming:
      return y, None
    last_id = segment_ids[:, -1]
    new_inputs = xp[:, xp.shape[1] - km1:]
    new_ids = sp[:, sp.shape[1] - km1:]
    # Zero inputs from an earlier document so the next chunk can mask against last_id alone.
    new_inputs = jnp.where((new_ids == last_id[:, None])[..., None], new_inputs, 0)
    return y, {"inputs": new_inputs.astype(cache["inputs"].dtype), "segment_id": last_id}


# --------------------------------------------------------------------------------------------
# Rotary position embedding


def apply_rope(x: Array, positions: Array, *, base: float = 10000.0) -> Array:
  """Rotary position embedding (Su et al. 2021), half-split ("rotate_half") convention.

  x: [batch, length, heads, head_dim] (head_dim even); positions: [batch, length] or [length].
  With h = head_dim / 2, the pairs (x[..., i], x[..., i + h]) for i < h are rotated by the angle
  theta_i = position * base^(-2i / head_dim):
    out[..., i]     = x[..., i] cos(theta_i) - x[..., i + h] sin(theta_i)
    out[..., i + h] = x[..., i + h] cos(theta_i) + x[..., i] sin(theta_i)
  i.e. the complex number x[..., i] + 1j * x[..., i + h] is multiplied by exp(1j * theta_i). Hence
  <rope(q, m), rope(k, n)> depends only on m - n. Computed in float32, returned in x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"apply_rope: x must be [batch, length, heads, head_dim], got {x.shape}")
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rope: head_dim must be even, got {head_dim}")
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  if positions.ndim != 2 or positions.shape[-1] != x.shape[1]:
    raise ValueError(f"apply_rope: positions must be [batch, length] or [length] with length "
                     f"{x.shape[1]}, got {positions.shape}")
  half = head_dim // 2
  inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
  theta = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(theta)[:, :, None], jnp.sin(theta)[:, :, None]  # [batch, length, 1, half]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Mixer registry

_MIXERS: dict[str, type[nn.Module] | str] = {}


def register_mixer(name: str, target: type[nn.Module] | str, *, overwrite: bool = False) -> None:
  """Register a mixer class under `name`.

  target: a flax Module class, or a lazy "package.module:ClassName" string imported on first
  `get_mixer(name)` (so this file need not import every mixer, and mixers may import it).
  Registering a name again with a different target needs `overwrite=True`.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_mixer: name must be a non-empty string, got {name!r}")
  if isinstance(target, str):
    module_path, sep, cls_name = target.partition(":")
    if not sep or not module_path or not cls_name:
      raise ValueError(f"register_mixer({name!r}): target string must look like "
                       f"'package.module:ClassName', got {target!r}")
  elif not (isinstance(target, type) and issubclass(target, nn.Module)):
    raise ValueError(f"register_mixer({name!r}): target must be a flax.linen Module class or a "
                     f"'package.module:ClassName' string, got {target!r}")
  if name in _MIXERS and _MIXERS[name] != target and not overwrite:
    raise ValueError(f"register_mixer: mixer {name!r} is already registered to "
                     f"{_MIXERS[name]!r}; pass overwrite=True to replace it")
  _MIXERS[name] = target


def mixer_names() -> tuple[str, ...]:
  """Names of all registered mixers, sorted."""
  return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> type[nn.Module]:
  """The mixer class registered under `name` (imported now if it was registered lazily)."""
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(mixer_names())}")
  target = _MIXERS[name]
  if isinstance(target, str):
    module_path, _, cls_name = target.partition(":")
    try:
      module = importlib.import_module(module_path)
    except ImportError as e:
      raise ImportError(f"mixer {name!r}: cannot import module {module_path!r} "
                        f"(registered as {target!r}): {e}") from e
    try:
      target = getattr(module, cls_name)
    except AttributeError:
      raise ValueError(f"mixer {name!r}: module {module_path!r} has no attribute "
                       f"{cls_name!r} (registered as {target!r})") from None
    _MIXERS[name] = target
  return target


register_mixer("s4d", "layers.s4d:S4D")
register_mixer("s4", "layers.s4:S4")
register_mixer("s5", "layers.s5:S5")
register_mixer("mamba", "layers.mamba:Mamba")
register_mixer("mamba2", "layers.mamba2:Mamba2")
register_mixer("long_conv", "layers.explicit_long_conv:LongConv")
register_mixer("hyena", "layers.hyena:Hyena")
register_mixer("attention", "layers.attention:Attention")
register_mixer("gated_deltanet", "layers.gated_delta:GatedDeltaNet")


# --------------------------------------------------------------------------------------------
# Residual block


def _kwargs_dict(kwargs: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None) -> dict:
  if kwargs is None:
    return {}
  try:
    return dict(kwargs)
  except (TypeError, ValueError):
    raise ValueError("ResidualBlock.mixer_kwargs must be a mapping or a tuple of (name, value) "
                     f"pairs, got {kwargs!r}") from None


class ResidualBlock(nn.Module):
  """A mixer sub-block and an optional gated-MLP sub-block, each with a residual connection.

  prenorm:  x = x + drop(mixer(norm(x)));   x = x + drop(mlp(mlp_norm(x)))
  postnorm: x = norm(x + drop(mixer(x)));   x = mlp_norm(x + drop(mlp(x)))
  x: [batch, length, d_model]. The MLP sub-block exists when mlp_ratio > 0 (hidden size
  int(mlp_ratio * d_model)). `mixer` is a registry name (see `register_mixer`); `mixer_kwargs`
  is a mapping or a tuple of (name, value) pairs passed to the mixer constructor (tuples keep the
  module hashable). The call follows the mixer interface: `(x, *, segment_ids, cache) -> (y,
  cache)`, the cache being the mixer's cache. `seq_axis` is passed to the mixer (sequence
  parallelism, see `layers.sequence_parallel`); the norms and the MLP act per token.
  """

  d_model: int
  mixer: str
  mixer_kwargs: Any = ()
  norm: str = "layer"
  prenorm: bool = True
  dropout: float = 0.0
  mlp_ratio: float = 0
  mlp_activation: str = "swiglu"
  deterministic: bool = True
  seq_axis: str | None = None

  def _mixer_cls_and_kwargs(self) -> tuple[type[nn.Module], dict]:
    kwargs = _kwargs_dict(self.mixer_kwargs)
    for own in ("d_model", "seq_axis"):
      if own in kwargs:
        raise ValueError(f"ResidualBlock.mixer_kwargs must not contain {own!r} (it is "
                         f"ResidualBlock.{own})")
    cls = get_mixer(self.mixer)
    if self.seq_axis is not None:
      if "seq_axis" not in getattr(cls, "__dataclass_fields__", {}):
        raise ValueError(f"mixer {self.mixer!r} ({cls.__name__}) has no seq_axis field, so it "
                         "cannot run sequence-parallel")
      kwargs["seq_axis"] = self.seq_axis
    return cls, kwargs

  def setup(self):
    if self.norm not in _NORMS:
      raise ValueError(f"ResidualBlock.norm={self.norm!r} is not one of {sorted(_NORMS)}")
    cls, kwargs = self._mixer_cls_and_kwargs()
    self.mixer_norm = _NORMS[self.norm]()
    self.mixer_layer = cls(d_model=self.d_model, **kwargs)
    self.drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
    if self.mlp_ratio < 0:
      raise ValueError(f"ResidualBlock.mlp_ratio must be >= 0, got {self.mlp_ratio}")
    if self.mlp_ratio > 0:
      self.mlp_norm = _NORMS[self.norm]()
      self.mlp = GatedMLP(int(self.mlp_ratio * self.d_model), activation=self.mlp_activation,
                          deterministic=self.deterministic)

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> Any:
    """The mixer's cache. Works on an unbound module (no parameters needed)."""
    cls, kwargs = self._mixer_cls_and_kwargs()
    return cls(d_model=self.d_model, parent=None, **kwargs).init_cache(batch_size, dtype)

  def __call__(self, x: Array, *, segment_ids: Array | None = None,
               cache: Any = None) -> tuple[Array, Any]:
    if x.shape[-1] != self.d_model:
      raise ValueError(f"ResidualBlock(d_model={self.d_model}) got x of shape {x.shape}")

    def sub(f, norm, h):
      if self.prenorm:
        return h + self.drop(f(norm(h)))
      return norm(h + self.drop(f(h)))

    def mix(h):
      nonlocal cache
      y, cache = self.mixer_layer(h, segment_ids=segment_ids, cache=cache)
      return y

    x = sub(mix, self.mixer_norm, x)
    if self.mlp_ratio > 0:
      x = sub(self.mlp, self.mlp_norm, x)
    return x, cache
