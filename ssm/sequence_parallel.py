"""Sequence parallelism for whole models: one sequence split over the `seq` mesh axis, each device
holding L / n consecutive tokens of it, so a sequence can be longer than one device's memory.

`model_apply` runs `model.apply` inside `jax.shard_map` over the seq axis only (the other mesh
axes stay automatic, so data / fsdp / tensor sharding of batch and parameters works as without it).
The model must be built with `seq_axis` set to that axis: every mixer then computes its exact
whole-sequence outputs from its shard (see `layers.sequence_parallel` for what each exchanges),
embeddings, norms and MLPs act per token, and a classifier's pooling sums over the shards.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P


def model_apply(model, variables: Any, inputs: jax.Array, *, mesh: Mesh,
                mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """`model.apply(variables, inputs, mask=, segment_ids=, rngs=)[0]` with the length split over
  the mesh axis `model.seq_axis`.

  inputs [batch, L] tokens or [batch, L, d_input]; mask / segment_ids [batch, L]; L must divide
  by the axis size. Dropout keys are folded with the shard index, so shards draw different masks.
  Returns the logits: [batch, L, vocab] (LM, length-sharded) or [batch, classes] (classifier).
  """
  axis = model.seq_axis
  if axis is None:
    raise ValueError("model_apply: the model has no seq_axis (build it with seq_axis='seq')")
  n = mesh.shape[axis]
  if inputs.shape[1] % n:
    raise ValueError(f"model_apply: sequence length {inputs.shape[1]} does not divide over the "
                     f"{n} devices of mesh axis {axis!r}")
  length_spec = lambda a: P(None, axis, *([None] * (a.ndim - 2)))
  optional = {"mask": mask, "segment_ids": segment_ids}
  given = {k: v for k, v in optional.items() if v is not None}
  rngs = rngs or {}

  def local(variables, inputs, given, rngs):
    index = jax.lax.axis_index(axis)
    rngs = {name: jax.random.fold_in(key, index) for name, key in rngs.items()}
    return model.apply(variables, inputs, rngs=rngs, **given)[0]

  out_spec = P(None, axis, None) if model.head == "lm" else P()
  in_specs = (jax.tree.map(lambda _: P(), variables), length_spec(inputs),
              {k: length_spec(v) for k, v in given.items()}, jax.tree.map(lambda _: P(), rngs))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       axis_names={axis}, check_vma=False)(variables, inputs, given, rngs)
