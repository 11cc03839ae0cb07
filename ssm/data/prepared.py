"""What every task module hands to the trainer: `Prepared`, and the helpers task modules share.

A task module (listed in `ssm.data.tasks.TASK_MODULES`) defines `TASK_SPECS`, {task name:
TaskSpec}, each with

  kind     "classify" (one label per sequence), "retrieval" (one label per pair of sequences) or
           "lm" (per-position targets)
  fields   {setting: default} of its own settings under `config.data` (besides the common ones:
           name, data_dir, manual_dir, seq_len, batch_size, eval_batch_size, truncate)
  load(settings, *, data_dir, manual_dir) -> Prepared
           settings: {field: value} for every name of `fields`; writes the data once if needed;
           bad settings raise ConfigError naming "data.<field>"

Examples of a split are mappings with
  "tokens"   int [n] token ids >= 1 (0 is padding), or float32 [n, d] features
  "tokens2"  int [m]  (retrieval only) the second document
  "label"    int      (classify / retrieval)
  "targets"  int [n]  (lm, optional) the token to predict after reading tokens[: t + 1], or
                      IGNORE_INDEX; without it an LM predicts tokens[t + 1]
An LM split may instead be one long 1-D int stream (`TokenStream`), which the pipeline cuts into
windows of whatever length is asked (training length, or longer for extrapolation).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ssm.config import ConfigError

SPLITS = ("train", "validation", "test")
KINDS = ("classify", "retrieval", "lm")
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task: its kind, its settings with their defaults, and its loader (see the module doc)."""

  kind: str
  fields: Mapping[str, Any]
  load: Callable[..., "Prepared"]
  description: str = ""


@dataclasses.dataclass
class TokenStream:
  """One split of an LM corpus as a single token stream: `tokens` int [num_tokens] (a numpy
  array or memmap), documents joined by `boundary` (a token id, or None when there is none)."""

  tokens: np.ndarray
  boundary: int | None = None

  def __len__(self) -> int:
    return int(self.tokens.shape[0])


@dataclasses.dataclass
class Prepared:
  """A task's data, ready for the pipelines.

  kind          one of KINDS
  vocab_size    token ids are < vocab_size (0 for float features)
  num_classes   labels are < num_classes (0 for an LM)
  sources       split -> random-access Sequence of examples, or a TokenStream (lm only)
  max_num_tokens  split -> tokens of the longest example (None: unknown / a stream)
  label_counts  split -> examples per class (None: count by reading)
  unit          what one token is, for the reports: "byte" (bits per byte), "base", "token"
  d_input       feature size of float examples (0: token ids)
  """

  kind: str
  vocab_size: int
  num_classes: int
  sources: Mapping[str, Any]
  max_num_tokens: Mapping[str, int] | None = None
  label_counts: Mapping[str, Sequence[int]] | None = None
  unit: str = "token"
  d_input: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Prepared.kind {self.kind!r} is not one of {KINDS}")
    missing = [s for s in SPLITS if s not in self.sources]
    if missing:
      raise ValueError(f"Prepared.sources lacks the splits {missing}")


def setting_int(settings: Mapping[str, Any], name: str, low: int = 1) -> int:
  """settings[name] as an int >= low, else ConfigError naming `data.<name>`."""
  value = settings[name]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ConfigError(f"data.{name}", f"must be an integer >= {low}, got {value!r}")
  return int(value)


def setting_float(settings: Mapping[str, Any], name: str, low: float, high: float) -> float:
  """settings[name] as a float in [low, high], else ConfigError naming `data.<name>`."""
  value = settings[name]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise ConfigError(f"data.{name}", f"must be a number in [{low}, {high}], got {value!r}")
  return float(value)


def setting_choice(settings: Mapping[str, Any], name: str, choices: Sequence[Any]) -> Any:
  """settings[name] if it is one of `choices`, else ConfigError naming `data.<name>`."""
  value = settings[name]
  if value not in choices:
    raise ConfigError(f"data.{name}", f"{value!r} is not one of {', '.join(map(repr, choices))}")
  return value


def setting_path(settings: Mapping[str, Any], name: str, required: bool = False) -> str | None:
  """settings[name] as a path string (None allowed unless `required`)."""
  value = settings[name]
  if value is None and not required:
    return None
  if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
    raise ConfigError(f"data.{name}", f"must be a path{'' if required else ' or None'}, "
                      f"got {value!r}")
  return os.fspath(value)


def prepare_builder(builder, manual_dir: str | None = None) -> None:
  """`builder.download_and_prepare()` once: with several JAX processes, process 0 writes first and
  the others then find it (shared data_dir) or write the same deterministic data themselves."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if jax.process_count() == 1:
    builder.download_and_prepare(download_config=download_config)
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    builder.download_and_prepare(download_config=download_config)
  multihost_utils.sync_global_devices(f"ssm.data.prepare.{builder.name}")
  if jax.process_index() != 0:
    builder.download_and_prepare(download_config=download_config)


def from_builder(builder, *, kind: str, vocab_size: int, num_classes: int, unit: str = "token",
                 d_input: int = 0) -> Prepared:
  """A Prepared over a prepared TFDS builder's splits (`as_data_source`), with the
  "max_num_tokens" and "label_counts" of its metadata when it wrote them."""
  metadata = builder.info.metadata or {}
  return Prepared(kind=kind, vocab_size=vocab_size, num_classes=num_classes,
                  sources={s: builder.as_data_source(s) for s in SPLITS},
                  max_num_tokens=metadata.get("max_num_tokens"),
                  label_counts=metadata.get("label_counts"), unit=unit, d_input=d_input)


class ArraySource(Sequence):
  """Random access over stacked arrays: example i = {key: arrays[key][i]} (all share axis 0)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"ArraySource: arrays of different lengths {sizes}")
    self._arrays = dict(arrays)
    self._n = next(iter(sizes.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if not -self._n <= i < self._n:
      raise IndexError(f"example {i} out of range for {self._n}")
    return {k: v[i] for k, v in self._arrays.items()}


class MappedSource(Sequence):
  """`fn(source[i])` for each example, computed when read (e.g. pixel tokens -> features)."""

  def __init__(self, source: Sequence, fn: Callable[[Mapping[str, Any]], Mapping[str, Any]]):
    self._source, self._fn = source, fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    return self._fn(self._source[i])


class SubsetSource(Sequence):
  """The examples of `source` at `indices` (int [n]), in that order: e.g. a validation split
  carved out of a train split by a fixed permutation."""

  def __init__(self, source: Sequence, indices: Sequence[int]):
    self._source, self._indices = source, np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return int(self._indices.shape[0])

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]
