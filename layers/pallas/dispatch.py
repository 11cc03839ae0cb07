"""Choosing an op's implementation: the Pallas kernel where it applies, else the XLA form.

Every op with a kernel (`selective_scan`, `ssd`, `gated_delta_rule`, and
`prefix_window_attention` / `window_attention`) takes `impl=`:

  "reference"  the token-by-token spec          "xla"     the chunked XLA form
  "pallas"     the kernel (raises ValueError naming the reason if the call is unsupported;
               on CPU it runs in interpret mode, which is how the tests check it)
  "auto"       "pallas" on GPU/TPU where the kernel's `supports(...)` holds, else "xla"

The kernels compute the same function as the XLA form to float32 rounding (to bf16 rounding of
the matmul operands where the inputs are bf16: the attention, SSD and gated delta kernels feed
bf16 to the tensor cores), so the choice changes the speed, not the answer.

Under a mesh (set with `jax.set_mesh`, as `ssm.train` does), `on_mesh` runs a kernel inside
`jax.shard_map` over the batch axes (`data`, `fsdp`) and the head axis (`tensor`): XLA cannot
partition a custom call, and would otherwise gather the operands onto every device. `supports`
returns None for a supported call and otherwise a one-line reason (a shape, a dtype, an option),
so "auto" can fall back silently and "pallas" can say why it refuses.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

KERNEL_PLATFORMS = ("gpu", "tpu")
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def platform() -> str:
  """The default backend: "cpu", "gpu" or "tpu"."""
  return jax.default_backend()


def interpret_mode() -> bool:
  """Pallas kernels run in interpret mode where there is no GPU/TPU to compile them for."""
  return platform() not in KERNEL_PLATFORMS


def resolve(op: str, impl: str, unsupported: Callable[[], str | None],
            choices: tuple[str, ...] = ("reference", "xla", "pallas")) -> str:
  """The implementation to run for `impl` ("auto" resolved as the module docstring says).

  unsupported: () -> None if the kernel supports this call, else the reason (only evaluated for
  "auto" on GPU/TPU and for "pallas").
  """
  if impl == "auto":
    if platform() in KERNEL_PLATFORMS and unsupported() is None:
      return "pallas"
    return "xla"
  if impl not in choices:
    raise ValueError(f"{op}: impl must be one of {list(choices) + ['auto']}, got {impl!r}")
  if impl == "pallas":
    reason = unsupported()
    if reason is not None:
      raise ValueError(f"{op}: impl='pallas' does not support this call: {reason}")
  return impl


Dims = tuple[int | None, int | None]  # (batch dim, heads dim) of an array, each optional


def on_mesh(fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[Dims | None],
            out_dims: Sequence[Dims], *, batch: int, heads: Sequence[int]) -> Any:
  """fn(*args), inside `jax.shard_map` over the context mesh's batch and head axes.

  in_dims: per argument its (batch dim, heads dim) (None entries: not split along those axes;
  None for an argument that is None); out_dims likewise for fn's outputs (a tuple). The batch
  (size `batch`) is split over the BATCH_AXES of size > 1 when they divide it, the heads over
  HEAD_AXES when they divide every count in `heads` (e.g. query and value heads under GQA, so
  each shard keeps whole groups). Without a context mesh, or with nothing to split, it is a
  plain call. Axes already manual (inside an enclosing shard_map, e.g. over `seq`) are left
  alone.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  manual = set(getattr(mesh, "manual_axes", ()))

  def usable(axes: Sequence[str], sizes: Sequence[int]) -> tuple[str, ...]:
    axes = tuple(a for a in axes if a in mesh.shape and a not in manual and mesh.shape[a] > 1)
    ways = 1
    for a in axes:
      ways *= mesh.shape[a]
    return axes if all(n % ways == 0 for n in sizes) else ()

  batch_axes, head_axes = usable(BATCH_AXES, [batch]), usable(HEAD_AXES, heads)
  if not batch_axes and not head_axes:
    return fn(*args)

  def spec(dims: Dims | None, ndim: int) -> P:
    entries: list[Any] = [None] * ndim
    if dims is not None:
      if dims[0] is not None and batch_axes:
        entries[dims[0]] = batch_axes
      if dims[1] is not None and head_axes:
        entries[dims[1]] = head_axes
    return P(*entries)

  present = [i for i, a in enumerate(args) if a is not None]
  call = lambda *xs: fn(*[xs[present.index(i)] if i in present else None
                          for i in range(len(args))])
  out_shapes = jax.eval_shape(fn, *args)
  return jax.shard_map(
      call, mesh=mesh, axis_names=set(batch_axes) | set(head_axes), check_vma=False,
      in_specs=tuple(spec(in_dims[i], args[i].ndim) for i in present),
      out_specs=tuple(spec(d, o.ndim) for d, o in zip(out_dims, out_shapes)),
  )(*[args[i] for i in present])
