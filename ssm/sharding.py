"""Device meshes and how parameters, optimizer state and batches are laid out on them.

Mesh axes: `data` (batch), `fsdp` (batch, and parameters sharded over their embed dimension),
`tensor` (heads / MLP hidden units / vocabulary), `seq` (the length of the sequences). Sizes come
from the config's `mesh` section, `-1` meaning "the devices left over".

Logical axes name what a dimension is; `LOGICAL_RULES` is the one table mapping them to mesh axes.
Parameters get logical axes from their shape (layers stay free of sharding code): under the
scanned groups the leading axis is `layers`; a dimension of size d_model is `embed` (of a square
kernel, the last one for an output projection, else the first); the largest other dimension of a
matrix is `mlp` (hidden units, heads x head_dim, vocabulary); everything else is replicated. A
dimension is only sharded over mesh axes whose size divides it, so every model fits every mesh;
jit with these shardings computes the same numbers on any mesh (XLA inserts the collectives), only
faster or slower.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssm.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "seq")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("state", None),
    ("conv", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict | dict | None,
               num_devices: int) -> dict[str, int]:
  """{axis: size} for MESH_AXES from `mesh_cfg` (missing axes: 1; one axis may be -1 = the rest).

  Raises ConfigError naming the field when the sizes do not multiply to num_devices.
  """
  cfg = dict(mesh_cfg or {"data": -1})
  unknown = set(cfg) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"mesh.{sorted(unknown)[0]}", f"unknown mesh axis (known: "
                      f"{', '.join(MESH_AXES)})")
  sizes = {axis: int(cfg.get(axis, 1)) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh.{free[1]}", f"only one mesh axis may be -1 (also {free[0]})")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", f"must be a positive size or -1, got {size}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh.{free[0]}", f"the other axes use {fixed} devices, which does not "
                        f"divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError("mesh", f"axes {sizes} use {fixed} devices, but there are {num_devices}")
  return sizes


def make_mesh(mesh_cfg=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes MESH_AXES sized by `mesh_cfg`."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec of logical axes under LOGICAL_RULES, keeping only the mesh axes (of size
  > 1) whose product divides the dimension."""
  rules = dict(LOGICAL_RULES)
  used: set[str] = set()
  parts = []
  for name, dim in zip(logical, shape):
    target = rules.get(name) if name is not None else None
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept = []
    for axis in axes:
      size = mesh.shape[axis]
      ways = math.prod(mesh.shape[a] for a in kept) * size
      if size > 1 and axis not in used and dim % ways == 0:
        kept.append(axis)
    used.update(kept)
    parts.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*parts)


# Modules whose kernel maps features back to the residual stream ([features, d_model]).
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "w2")


def param_logical_axes(path: tuple[Any, ...], shape: tuple[int, ...], d_model: int
                       ) -> tuple[str | None, ...]:
  """Logical axes of one parameter from its path and shape (see the module docstring)."""
  names = [p.key if hasattr(p, "key") else str(p) for p in path]
  axes: list[str | None] = [None] * len(shape)
  start = 0
  if "groups" in names and shape:  # nn.scan stacks the groups on a leading axis
    axes[0], start = "layers", 1
  dims = list(range(start, len(shape)))
  if len(dims) >= 2:
    candidates = [i for i in dims if shape[i] == d_model]
    # A square projection [d_model, d_model]: an output projection reads heads / hidden units and
    # writes the residual stream, so its embed dimension is the last (Megatron's row split).
    output = any(name in OUTPUT_PROJECTIONS for name in names)
    embed = (candidates[-1] if output else candidates[0]) if candidates else None
    if embed is not None:
      axes[embed] = "embed"
      others = [i for i in dims if i != embed]
      axes[max(others, key=lambda i: shape[i])] = "mlp"
  return tuple(axes)


def param_shardings(abstract_params: Any, mesh: Mesh, d_model: int) -> Any:
  """NamedShardings for a pytree of parameters (arrays or ShapeDtypeStructs)."""
  def one(path, leaf):
    logical = param_logical_axes(path, leaf.shape, d_model)
    return NamedSharding(mesh, spec_for(logical, leaf.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, abstract_params)


def optimizer_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                        shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `optimizer.init(params)`: a leaf whose key path ends with a parameter's path
  (Adam's moments) is sharded like that parameter; the rest (counts) is replicated."""
  by_path = {}
  for path, sharding in jax.tree_util.tree_leaves_with_path(shardings):
    by_path[_dict_keys(path)] = sharding
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      sharding = by_path.get(keys[start:])
      if sharding is not None and len(sharding.spec) <= leaf.ndim:
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """[batch, length, ...] arrays: batch over data x fsdp, length over seq (ndim 1: batch only)."""
  logical = ("batch", "length")[:ndim] + (None,) * max(ndim - 2, 0)
  rules = dict(LOGICAL_RULES)
  return NamedSharding(mesh, P(*[rules[n] if n else None for n in logical]))
