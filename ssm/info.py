"""`python -m ssm info --config ...`: the layer table and parameter counts of a config's model,
from shapes alone (`jax.eval_shape`: nothing is allocated, so 1.3B-parameter models print on a
laptop)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ssm import model as model_lib


def parameter_shapes(config: ml_collections.ConfigDict, *, num_outputs: int,
                     vocab_size: int) -> Any:
  """The model's parameter tree as ShapeDtypeStructs."""
  model = model_lib.build_model(config.model, num_outputs=num_outputs, vocab_size=vocab_size)
  length = min(int(config.data.seq_len), 16)
  if config.model.input == "tokens":
    inputs = jax.ShapeDtypeStruct((1, length), jnp.int32)
  else:
    inputs = jax.ShapeDtypeStruct((1, length, config.model.d_input), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), inputs)["params"]


def _count(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def describe(config: ml_collections.ConfigDict, *, num_outputs: int, vocab_size: int) -> str:
  """A table of the pattern's blocks (mixer, MLP, parameters per block and over all groups) and
  the totals."""
  params = parameter_shapes(config, num_outputs=num_outputs, vocab_size=vocab_size)
  specs = model_lib.layer_specs(config.model)
  n_groups = config.model.n_layers // len(specs)
  if config.model.scan_layers:
    per_block = [params["groups"][f"{i}_{s.name}"] for i, s in enumerate(specs)]
    block_counts = [_count(b) // n_groups for b in per_block]
    mixer_counts = [_count(b.get("mixer_layer", {})) // n_groups for b in per_block]
  else:
    per_block = [params["group_0"][f"{i}_{s.name}"] for i, s in enumerate(specs)]
    block_counts = [_count(b) for b in per_block]
    mixer_counts = [_count(b.get("mixer_layer", {})) for b in per_block]
  rows = [("entry", "mixer", "mlp ratio", "mixer params", "block params", f"x {n_groups} groups")]
  for spec, block, mixer in zip(specs, block_counts, mixer_counts):
    rows.append((spec.name, spec.mixer, f"{spec.mlp_ratio:g}", f"{mixer:,}", f"{block:,}",
                 f"{block * n_groups:,}"))
  total = _count(params)
  embed = _count(params.get("embed", {}))
  head = _count(params.get("out", {}))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [f"model: {config.model.n_layers} blocks = {n_groups} x pattern "
           f"{config.model.pattern!r}, d_model {config.model.d_model}, compute {config.model.dtype}"
           f"{', layers scanned' if config.model.scan_layers else ''}"]
  for n, r in enumerate(rows):
    cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
    lines.append("  ".join(cells))
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  blocks = total - embed - head - _count(params.get("final_norm", {}))
  lines.append(f"embedding {embed:,}; head {head:,}; blocks {blocks:,}")
  lines.append(f"total parameters {total:,} ({total / 1e6:.1f}M); without the embedding "
               f"{total - embed:,} ({(total - embed) / 1e6:.1f}M)")
  return "\n".join(lines)


def parameter_count(config: ml_collections.ConfigDict, *, num_outputs: int, vocab_size: int) -> int:
  return _count(parameter_shapes(config, num_outputs=num_outputs, vocab_size=vocab_size))
