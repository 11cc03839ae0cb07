"""Orbax checkpoints that let a killed run resume exactly: train state (model, optimizer, step) and
the data iterator's position, saved together every N steps, the newest `keep` kept.

Saving is asynchronous: the train loop goes on while the arrays are written; `close()` (or `wait()`)
blocks until the last save is on disk.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def checkpoint_dir(train_cfg, workdir: str | pathlib.Path) -> str | pathlib.Path:
  """A run's checkpoint folder: `train.checkpoint_dir` if set (a path or a URL such as
  gs://bucket/run), else <workdir>/checkpoints."""
  return train_cfg.checkpoint_dir or pathlib.Path(workdir) / "checkpoints"


def _resolve(directory: str | pathlib.Path) -> epath.Path:
  """Local paths made absolute (orbax needs that); URLs (gs://, s3://, ...) as they are."""
  return epath.Path(directory if "://" in str(directory) else pathlib.Path(directory).absolute())


class Checkpointer:
  """Saves and restores {"state": pytree of arrays, "data": JSON-serialisable iterator state}."""

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int = 3, async_save: bool = True):
    """directory: a local path or a URL orbax can write (gs://bucket/path)."""
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(every, 1), enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(_resolve(directory), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (and whenever `force`); returns whether a save started."""
    if self.every <= 0 and not force:
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
    """Restores `step` (default: the newest) into the shapes, dtypes and shardings of `abstract_state`.

    `abstract_state` is a pytree of arrays or `jax.ShapeDtypeStruct`s carrying their sharding.
    Returns (state, data_state, step), or None when the directory holds no checkpoint.
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
