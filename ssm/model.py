"""Hybrid sequence models built from a pattern of mixer names.

    inputs [batch, length] tokens (or [batch, length, d_input] features)
      -> embedding (nn.Embed, or a linear encoder for continuous inputs)     [batch, length, d_model]
      -> n_layers residual blocks, block i mixing with pattern[i % len(pattern)]
      -> final norm (pre-norm models only: post-norm blocks end normalised)
      -> head: classifier  = pooling over real tokens (mean or last) + Dense  [batch, num_classes]
               LM          = Dense to the vocabulary                          [batch, length, vocab]

`mask` ([batch, length] bool, True on real tokens) marks padding. Padded positions are zeroed before
every block, so padding cannot reach real tokens even through a bidirectional (non-causal) mixer,
and the classifier pools over real tokens only.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from layers import blocks
from ssm import config as config_lib


class SequenceModel(nn.Module):
  """See the module docstring. `mixer_kwargs` maps a mixer name to its keyword arguments."""

  pattern: Sequence[str]
  d_model: int
  head: str = "classify"
  num_outputs: int = 10  # classes, or the vocabulary size of an LM
  vocab_size: int = 0  # > 0: token inputs through an embedding table
  mixer_kwargs: Any = None
  norm: str = "layer"
  prenorm: bool = True
  dropout: float = 0.0
  mlp_ratio: int = 0
  mlp_activation: str = "swiglu"
  pool: str = "mean"
  deterministic: bool = True

  def setup(self):
    if self.vocab_size > 0:
      self.embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(1.0))
    else:
      self.embed = nn.Dense(self.d_model)
    kwargs = dict(self.mixer_kwargs or {})
    # Tuples of pairs keep the blocks hashable (usable as static arguments).
    self.blocks = [
        blocks.ResidualBlock(
            d_model=self.d_model, mixer=name, mixer_kwargs=tuple(sorted(dict(kwargs.get(name, {})).items())),
            norm=self.norm,
            prenorm=self.prenorm, dropout=self.dropout, mlp_ratio=self.mlp_ratio,
            mlp_activation=self.mlp_activation, deterministic=self.deterministic, name=f"block_{i}")
        for i, name in enumerate(self.pattern)
    ]
    norm_cls = blocks.RMSNorm if self.norm == "rms" else blocks.LayerNorm
    self.final_norm = norm_cls() if self.prenorm else None
    self.out = nn.Dense(self.num_outputs)

  def __call__(self, inputs, *, mask=None, segment_ids=None, cache=None):
    """inputs [batch, length] int or [batch, length, d_input]; mask [batch, length] bool.

    Returns (outputs, cache): logits [batch, num_classes] for a classifier, [batch, length, vocab] for
    an LM; `cache` is the list of per-block caches when streaming (an LM decoding), else None.
    """
    x = self.embed(inputs)
    keep = None if mask is None else mask[..., None].astype(x.dtype)
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      if keep is not None:
        x = x * keep
      x, c = block(x, segment_ids=segment_ids, cache=None if cache is None else cache[i])
      if new_cache is not None:
        new_cache.append(c)
    if self.final_norm is not None:
      x = self.final_norm(x)
    if self.head == "lm":
      return self.out(x), new_cache
    return self.out(self._pool(x, mask)), new_cache

  def _pool(self, x, mask):
    """[batch, length, d_model] -> [batch, d_model] over the real tokens only."""
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    if self.pool == "mean":
      w = mask.astype(jnp.float32)[..., None]
      return (jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(w.sum(axis=1), 1.0)).astype(x.dtype)
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    return [block.init_cache(batch_size, dtype) for block in self.blocks]


def build_model(model_cfg: ml_collections.ConfigDict, *, num_outputs: int, vocab_size: int = 0,
                deterministic: bool = True) -> SequenceModel:
  """The model a validated config describes (see ssm.config). vocab_size > 0 selects token inputs."""
  mixer_kwargs = {name: dict(kw) for name, kw in model_cfg.mixers.items()}
  return SequenceModel(
      pattern=config_lib.pattern_of(model_cfg), d_model=model_cfg.d_model, head=model_cfg.task,
      num_outputs=num_outputs, vocab_size=vocab_size if model_cfg.input == "tokens" else 0,
      mixer_kwargs=mixer_kwargs, norm=model_cfg.norm, prenorm=model_cfg.prenorm,
      dropout=model_cfg.dropout, mlp_ratio=model_cfg.mlp_ratio, mlp_activation=model_cfg.mlp_activation,
      pool=model_cfg.pool, deterministic=deterministic)


def ssm_param_names(pattern: Sequence[str]) -> frozenset[str]:
  """Names of the parameters that go to the SSM optimizer group, declared by the mixers used."""
  names: set[str] = set()
  for name in set(pattern):
    names.update(getattr(blocks.get_mixer(name), "ssm_param_names", ()))
  return frozenset(names)
