"""Hybrid sequence models: a group of residual blocks given by a pattern, repeated.

    inputs [batch, length] tokens (or [batch, length, d_input] features)
      -> embedding (nn.Embed, or a linear encoder for continuous inputs)  [batch, length, d_model]
      -> n_groups x (the group: one residual block per pattern entry)
      -> final norm (pre-norm models only: post-norm blocks end normalised)
      -> head: classifier  = pooling over real tokens (mean or last) + Dense  [batch, num_classes]
               retrieval   = the same trunk and pooling on both documents of a pair, u and v,
                             then an MLP on [u, v, u * v, u - v] (the LRA two-tower head)
                                                                              [batch, num_classes]
               LM          = Dense to the vocabulary                          [batch, length, vocab]

Retrieval inputs are pairs side by side: tokens [batch, length, 2] and mask [batch, length, 2];
the two documents run through the trunk as one batch of 2 * batch sequences.

A pattern entry (`LayerSpec`) names a mixer type from the registry (`layers.blocks`), its keyword
arguments and the MLP ratio of its block (0: no MLP, as in Mamba models). With `scan_layers` the
repeated groups run under `nn.scan` (their parameters stacked on a leading axis of n_groups), so
compile time does not grow with depth; `remat` wraps each group in `nn.remat` with a checkpoint
policy. Parameters are float32; the blocks compute in `dtype` (e.g. bfloat16), the mixers keep
their recurrent states and softmaxes in float32, and the logits are float32.

With `seq_axis` (sequence parallelism) the model runs inside `jax.shard_map` over that mesh axis on
one contiguous shard of every sequence (see `ssm.sequence_parallel.model_apply`): the mixers
exchange what their equations need with the other shards (`layers.sequence_parallel`), everything
else acts per token, and the classifier's pooling sums over all shards.

`mask` ([batch, length] bool, True on real tokens) marks padding. Padded positions are zeroed before
every block, so padding cannot reach real tokens even through a bidirectional (non-causal) mixer,
and the classifier pools over real tokens only.

Caches (streaming / decoding) are a tuple with one entry per pattern entry, each the mixer's cache
with a leading axis of n_groups, whether or not the layers are scanned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from layers import blocks
from ssm import config as config_lib

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One pattern entry: `name` (the entry, e.g. "swa"), `mixer` (its registry type, e.g.
  "attention"), the mixer's keyword arguments as sorted (name, value) pairs, and the MLP ratio."""

  name: str
  mixer: str
  mixer_kwargs: tuple[tuple[str, Any], ...] = ()
  mlp_ratio: float = 0


class BlockGroup(nn.Module):
  """One pass over the pattern: a ResidualBlock per LayerSpec, named "<i>_<entry name>".

  __call__(x, keep, segment_ids, cache) -> (x, cache): keep [batch, length, 1] (zeroes padding
  before each block) or None; cache a tuple of the blocks' caches, or None.
  """

  specs: tuple[LayerSpec, ...]
  d_model: int
  norm: str = "layer"
  prenorm: bool = True
  dropout: float = 0.0
  mlp_activation: str = "swiglu"
  deterministic: bool = True
  seq_axis: str | None = None

  def _make_blocks(self, unbound: bool = False) -> list[blocks.ResidualBlock]:
    """The blocks as submodules, or as unbound modules (for `init_cache`)."""
    return [blocks.ResidualBlock(
        d_model=self.d_model, mixer=spec.mixer, mixer_kwargs=spec.mixer_kwargs, norm=self.norm,
        prenorm=self.prenorm, dropout=self.dropout, mlp_ratio=spec.mlp_ratio,
        mlp_activation=self.mlp_activation, deterministic=self.deterministic,
        seq_axis=self.seq_axis, **({"parent": None} if unbound else {"name": f"{i}_{spec.name}"}))
        for i, spec in enumerate(self.specs)]

  @nn.compact
  def __call__(self, x, keep, segment_ids, cache):
    new_cache = []
    for i, block in enumerate(self._make_blocks()):
      if keep is not None:
        x = x * keep
      x, c = block(x, segment_ids=segment_ids, cache=None if cache is None else cache[i])
      new_cache.append(c)
    return x, None if cache is None else tuple(new_cache)


class SequenceModel(nn.Module):
  """See the module docstring."""

  group: tuple[LayerSpec, ...]
  n_groups: int
  d_model: int
  head: str = "classify"
  num_outputs: int = 10  # classes, or the vocabulary size of an LM
  vocab_size: int = 0  # > 0: token inputs through an embedding table
  # LM head = the embedding table transposed, scaled by 1/sqrt(d_model) (as T5): the table is
  # N(0, 1) for the input, and unscaled its logits would start with a spread of sqrt(d_model).
  tie_embeddings: bool = False
  norm: str = "layer"
  prenorm: bool = True
  dropout: float = 0.0
  mlp_activation: str = "swiglu"
  pool: str = "mean"
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  deterministic: bool = True
  seq_axis: str | None = None

  @property
  def pattern(self) -> tuple[str, ...]:
    """The mixer type of every block, in order."""
    return tuple(spec.mixer for spec in self.group) * self.n_groups

  def setup(self):
    dtype = DTYPES[self.dtype]
    if self.vocab_size > 0:
      self.embed = nn.Embed(self.vocab_size, self.d_model, dtype=dtype,
                            embedding_init=nn.initializers.normal(1.0))
    else:
      self.embed = nn.Dense(self.d_model, dtype=dtype)
    group_cls = BlockGroup
    if self.remat != "none":
      group_cls = nn.remat(group_cls, policy=REMAT_POLICIES[self.remat],
                           prevent_cse=not self.scan_layers)
    if self.scan_layers:
      stack = nn.scan(group_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0), length=self.n_groups)
      self.groups = stack(self.group, self.d_model, self.norm, self.prenorm, self.dropout,
                          self.mlp_activation, self.deterministic, self.seq_axis, name="groups")
    else:
      self.groups = [group_cls(self.group, self.d_model, self.norm, self.prenorm, self.dropout,
                               self.mlp_activation, self.deterministic, self.seq_axis,
                               name=f"group_{g}")
                     for g in range(self.n_groups)]
    norm_cls = blocks.RMSNorm if self.norm == "rms" else blocks.LayerNorm
    self.final_norm = norm_cls() if self.prenorm else None
    if self.tie_embeddings and (self.head != "lm" or self.vocab_size != self.num_outputs):
      raise ValueError("SequenceModel.tie_embeddings needs an LM head over the input vocabulary "
                       f"(head {self.head!r}, vocab_size {self.vocab_size}, num_outputs "
                       f"{self.num_outputs})")
    if not self.tie_embeddings:
      self.out = nn.Dense(self.num_outputs)
    if self.head == "retrieval":
      self.pair_hidden = nn.Dense(self.d_model)

  def __call__(self, inputs, *, mask=None, segment_ids=None, cache=None):
    """inputs [batch, length] int or [batch, length, d_input]; mask [batch, length] bool
    (retrieval: [batch, length, 2] both).

    Returns (outputs, cache): float32 logits [batch, num_classes] for a classifier, [batch, length,
    vocab] for an LM; `cache` (see the module docstring) when streaming, else None.
    """
    pairs = self.head == "retrieval"
    if pairs:  # [batch, length, 2] -> [2 * batch, length]: first documents, then second ones
      inputs = jnp.concatenate([inputs[..., 0], inputs[..., 1]], axis=0)
      mask = None if mask is None else jnp.concatenate([mask[..., 0], mask[..., 1]], axis=0)
    x = self.embed(inputs).astype(DTYPES[self.dtype])
    keep = None if mask is None else mask[..., None].astype(x.dtype)
    if self.scan_layers:
      x, new_cache = self.groups(x, keep, segment_ids, cache)
    else:
      new_cache = []
      for g, group in enumerate(self.groups):
        group_cache = None if cache is None else jax.tree.map(lambda a: a[g], cache)
        x, c = group(x, keep, segment_ids, group_cache)
        new_cache.append(c)
      new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_cache)
    if self.final_norm is not None:
      x = self.final_norm(x)
    x = x.astype(jnp.float32)
    if self.tie_embeddings:
      table = self.embed.variables["params"]["embedding"]
      logits = jnp.einsum("bld,vd->blv", x, table.astype(jnp.float32))
      return logits * self.d_model ** -0.5, new_cache
    if self.head == "lm":
      return self.out(x), new_cache
    pooled = self._pool(x, mask)
    if pairs:
      u, v = jnp.split(pooled, 2, axis=0)
      pooled = nn.gelu(self.pair_hidden(jnp.concatenate([u, v, u * v, u - v], axis=-1)))
    return self.out(pooled), new_cache

  def _pool(self, x, mask):
    """[batch, length, d_model] -> [batch, d_model] over the real tokens only."""
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    total = (lambda a: a) if self.seq_axis is None else (lambda a: jax.lax.psum(a, self.seq_axis))
    if self.pool == "mean":
      w = mask.astype(jnp.float32)[..., None]
      return total(jnp.sum(x * w, axis=1)) / jnp.maximum(total(w.sum(axis=1)), 1.0)
    # "last": the last real token of the whole sequence, held by one shard.
    offset = 0 if self.seq_axis is None else jax.lax.axis_index(self.seq_axis) * x.shape[1]
    last = jnp.maximum(total(jnp.sum(mask, axis=1)) - 1, 0) - offset
    here = (last >= 0) & (last < x.shape[1])
    picked = jnp.take_along_axis(x, jnp.clip(last, 0, x.shape[1] - 1)[:, None, None], axis=1)
    return total(jnp.where(here[:, None], picked[:, 0], 0.0))

  def init_cache(self, batch_size: int, dtype=jnp.float32):
    """Fresh caches: per pattern entry, the mixer's cache stacked n_groups times. Works unbound."""
    group = BlockGroup(self.group, self.d_model, self.norm, self.prenorm, self.dropout,
                       self.mlp_activation, self.deterministic, parent=None)
    per_block = [b.init_cache(batch_size, dtype) for b in group._make_blocks(unbound=True)]
    return tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (self.n_groups,) + a.shape), c)
                 for c in per_block)


def layer_specs(model_cfg: ml_collections.ConfigDict) -> tuple[LayerSpec, ...]:
  """The group a model config describes: per pattern entry its mixer type, the mixer's keyword
  arguments (`model.mixers.<entry>` less the reserved keys) and its MLP ratio."""
  specs = []
  for entry in config_lib.pattern_entries(model_cfg):
    settings = dict(model_cfg.mixers.get(entry, {}))
    kwargs = tuple(sorted((k, v) for k, v in settings.items()
                          if k not in config_lib.RESERVED_ENTRY_KEYS))
    specs.append(LayerSpec(entry, config_lib.mixer_type(model_cfg, entry), kwargs,
                           settings.get("mlp_ratio", model_cfg.mlp_ratio)))
  return tuple(specs)


def build_model(model_cfg: ml_collections.ConfigDict, *, num_outputs: int, vocab_size: int = 0,
                deterministic: bool = True, seq_axis: str | None = None) -> SequenceModel:
  """The model a validated config describes (see ssm.config); vocab_size > 0: token inputs;
  seq_axis: run sequence-parallel over that mesh axis (see `ssm.sequence_parallel`)."""
  group = layer_specs(model_cfg)
  return SequenceModel(
      group=group, n_groups=model_cfg.n_layers // len(group), d_model=model_cfg.d_model,
      head=model_cfg.task, num_outputs=num_outputs,
      vocab_size=vocab_size if model_cfg.input == "tokens" else 0,
      tie_embeddings=model_cfg.tie_embeddings, norm=model_cfg.norm,
      prenorm=model_cfg.prenorm, dropout=model_cfg.dropout, mlp_activation=model_cfg.mlp_activation,
      pool=model_cfg.pool, dtype=model_cfg.dtype, scan_layers=model_cfg.scan_layers,
      remat=model_cfg.remat, deterministic=deterministic, seq_axis=seq_axis)


def ssm_param_names(pattern: Sequence[str]) -> frozenset[str]:
  """Names of the parameters that go to the SSM optimizer group, declared by the mixers used."""
  names: set[str] = set()
  for name in set(pattern):
    names.update(getattr(blocks.get_mixer(name), "ssm_param_names", ()))
  return frozenset(names)
