"""The data entry point of the trainer: `load_task(config.data, seed=...) -> Task`.

`config.data` holds the common fields below plus the settings of the task `data.name` names
(`task_fields(name)`: each task module's `TASK_SPECS`, see ssm.data.prepared):

  name              a task of TASK_MODULES (`python -m ssm tasks` lists them)
  data_dir          TFDS data directory / cache folder (None: TFDS's default)
  manual_dir        folder with downloaded release files, for tasks that read them (None:
                    generate, where the task can)
  seq_len           tokens per example after padding (LM corpora: the window length)
  batch_size        global training batch (split evenly over the JAX processes)
  eval_batch_size   global evaluation batch
  eval_examples     evaluate on the first this-many examples of a split (0: all of them)
  truncate          keep the first seq_len tokens of longer examples instead of failing

The `seed` argument (the run's seed) drives the training shuffle; `gen_seed` settings drive
generation. Data is written once under data_dir and reused by later runs with the same settings.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ssm.config import ConfigError
from ssm.data import pipeline
from ssm.data.prepared import SPLITS, Prepared, TaskSpec, TokenStream

# Task modules; each defines TASK_SPECS {task name: TaskSpec}.
TASK_MODULES = ("ssm.data.lra_listops", "ssm.data.lra_pathfinder", "ssm.data.lra_image",
                "ssm.data.lra_text", "ssm.data.lra_retrieval", "ssm.data.recall_tasks",
                "ssm.data.lm_bytes", "ssm.data.fasta", "ssm.data.arrays")
COMMON_FIELDS = {"name": "lra_listops", "data_dir": "data/tfds", "manual_dir": None,
                 "seq_len": 2048, "batch_size": 32, "eval_batch_size": 64, "eval_examples": 0,
                 "truncate": False}
_SPECS: dict[str, TaskSpec] = {}


def task_specs() -> dict[str, TaskSpec]:
  """Every registered task by name (imports the task modules on first use)."""
  if not _SPECS:
    for module in TASK_MODULES:
      for name, spec in importlib.import_module(module).TASK_SPECS.items():
        if name in _SPECS or name in COMMON_FIELDS:
          raise RuntimeError(f"task {name!r} of {module} is registered twice")
        clash = set(spec.fields) & set(COMMON_FIELDS)
        if clash:
          raise RuntimeError(f"task {name!r} of {module} redefines common fields {clash}")
        _SPECS[name] = spec
  return _SPECS


def task_spec(name: str) -> TaskSpec:
  specs = task_specs()
  if name not in specs:
    raise ConfigError("data.name", f"unknown task {name!r}; known: {', '.join(sorted(specs))}")
  return specs[name]


def task_fields(name: str) -> dict[str, Any]:
  """The `config.data` fields of task `name` with their defaults: common ones, then its own."""
  return {**COMMON_FIELDS, **task_spec(name).fields, "name": name}


@dataclasses.dataclass
class Task:
  """A prepared task and the pipelines over it.

  Batches are those of `ssm.data.pipeline` (per-process batch: the global one divided by
  jax.process_count()): "tokens" [batch, seq_len] int32 ([batch, seq_len, 2] for retrieval pairs,
  float32 [batch, seq_len, d_input] for features), "mask" bool like tokens without the feature
  axis, "weight" float32 [batch], and "label" int32 [batch] (classify, retrieval) or "targets"
  int32 [batch, seq_len] (LM tasks with explicit targets).
  """

  name: str
  kind: str  # classify | retrieval | lm
  vocab_size: int
  num_classes: int
  seq_len: int
  batch_size: int  # per process
  eval_batch_size: int  # per process
  seed: int
  truncate: bool
  prepared: Prepared = dataclasses.field(repr=False)
  eval_examples: int = 0
  _sources: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def unit(self) -> str:
    return self.prepared.unit

  @property
  def d_input(self) -> int:
    return self.prepared.d_input

  @property
  def is_stream(self) -> bool:
    """An LM corpus served as windows of a token stream (any window length works)."""
    return isinstance(self.prepared.sources["train"], TokenStream)

  @property
  def split_sizes(self) -> dict[str, int]:
    return {s: len(self.source(s)) for s in SPLITS}

  def source(self, split: str, seq_len: int | None = None) -> Sequence[Mapping[str, Any]]:
    """The random-access examples of a split (a stream: its windows of seq_len tokens)."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    seq_len = seq_len or self.seq_len
    key = (split, seq_len if self.is_stream else 0)
    if key not in self._sources:
      src = self.prepared.sources[split]
      self._sources[key] = pipeline.StreamWindows(src, seq_len) if self.is_stream else src
    return self._sources[key]

  def train_iterator(self) -> pipeline.TrainIterator:
    """A fresh endless iterator over the train split (get_state()/set_state() for resume)."""
    return pipeline.train_iterator(self.source("train"), batch_size=self.batch_size,
                                   seq_len=self.seq_len, seed=self.seed, truncate=self.truncate)

  def eval_batches(self, split: str, seq_len: int | None = None,
                   max_examples: int | None = None) -> pipeline.EvalBatches:
    """One pass over `split` ("validation" or "test"; its first `max_examples`, default
    data.eval_examples, 0 = all), filler examples weighted 0. `seq_len` overrides the length
    (LM streams: longer windows for length extrapolation)."""
    seq_len = seq_len or self.seq_len
    src = self.source(split, seq_len)
    limit = self.eval_examples if max_examples is None else max_examples
    if limit and limit < len(src):
      src = pipeline.first(src, limit)
    return pipeline.eval_batches(src, batch_size=self.eval_batch_size, seq_len=seq_len,
                                 truncate=self.truncate)

  def label_counts(self, split: str) -> np.ndarray:
    """Examples per class in `split`, int64 [num_classes]."""
    counts = (self.prepared.label_counts or {}).get(split)
    if counts is None:  # data written without the metadata: count by reading it
      src = self.source(split)
      counts = np.bincount([int(src[i]["label"]) for i in range(len(src))],
                           minlength=self.num_classes)
    return np.asarray(counts, dtype=np.int64)

  def majority_rate(self, split: str) -> float:
    """Accuracy of always predicting the most frequent class of `split`."""
    counts = self.label_counts(split)
    return float(counts.max() / max(counts.sum(), 1))


def _int(cfg: Mapping[str, Any], name: str, low: int) -> int:
  value = cfg[name]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ConfigError(f"data.{name}", f"must be an integer >= {low}, got {value!r}")
  return int(value)


def _path(cfg: Mapping[str, Any], name: str) -> str | None:
  value = cfg[name]
  if value is not None and not isinstance(value, (str, os.PathLike)):
    raise ConfigError(f"data.{name}", f"must be a path or None, got {value!r}")
  return None if value is None else os.fspath(value)


def load_task(data_cfg: Any, *, seed: int) -> Task:
  """Validates `data_cfg`, writes the dataset if needed, and returns the Task.

  Every configuration error is a ConfigError naming the field (e.g. "data.seq_len").
  """
  given = {k: data_cfg[k] for k in data_cfg.keys()}
  name = given.get("name", COMMON_FIELDS["name"])
  spec = task_spec(name)
  unknown = sorted(set(given) - set(COMMON_FIELDS) - set(spec.fields))
  if unknown:
    raise ConfigError(f"data.{unknown[0]}", f"task {name!r} has no such setting (its own: "
                      f"{', '.join(sorted(spec.fields)) or 'none'})")
  cfg = {**task_fields(name), **given}
  seq_len = _int(cfg, "seq_len", 1)
  batch_size = _int(cfg, "batch_size", 1)
  eval_batch_size = _int(cfg, "eval_batch_size", 1)
  eval_examples = _int(cfg, "eval_examples", 0)
  truncate = cfg["truncate"]
  if not isinstance(truncate, bool):
    raise ConfigError("data.truncate", f"must be True or False, got {truncate!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  processes = jax.process_count()
  for field, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if size % processes:
      raise ConfigError(f"data.{field}", f"{size} does not divide over {processes} processes")

  prepared = spec.load({k: cfg[k] for k in spec.fields}, data_dir=_path(cfg, "data_dir"),
                       manual_dir=_path(cfg, "manual_dir"))
  if not truncate:
    for split, longest in (prepared.max_num_tokens or {}).items():
      if longest > seq_len:
        raise ConfigError("data.seq_len",
                          f"{seq_len} is shorter than the longest {split} example ({longest} "
                          f"tokens); raise data.seq_len or set data.truncate=True")
  task = Task(name=name, kind=spec.kind, vocab_size=prepared.vocab_size,
              num_classes=prepared.num_classes, seq_len=seq_len,
              batch_size=batch_size // processes, eval_batch_size=eval_batch_size // processes,
              seed=int(seed), truncate=truncate, prepared=prepared, eval_examples=eval_examples)
  if len(task.source("train")) == 0:
    raise ConfigError("data.seq_len" if task.is_stream else "data.name",
                      f"task {task.name!r} has no training example"
                      + (f" of {seq_len} tokens" if task.is_stream else ""))
  return task
