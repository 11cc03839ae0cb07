"""The data entry point of the trainer: `load_task(config.data, seed=...) -> Task`.

`config.data` fields (an ml_collections ConfigDict or anything with attribute access):

  name              "lra_listops"
  data_dir          TFDS data directory (None: TFDS's default, ~/tensorflow_datasets)
  manual_dir        folder with the LRA release basic_{train,val,test}.tsv; None: generate
  seq_len           tokens per example after padding
  batch_size        global training batch (split evenly over the JAX processes)
  eval_batch_size   global evaluation batch (default: batch_size)
  num_train, num_val, num_test, min_length, max_length, max_depth, max_args, gen_seed
                    generator settings (used when manual_dir is None; see ssm.data.listops)
  operator_prob     optional generator setting (default None: chosen from min_length)
  truncate          keep the first seq_len tokens of longer examples instead of failing

The `seed` argument (the run's seed) drives the training shuffle; `gen_seed` drives generation.
The dataset is written once under data_dir (by process 0 first when there are several
processes) and reused by later runs with the same settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data import listops, pipeline
from ssm.data.lra_listops import LraListops, LraListopsConfig

TASK_NAMES = ("lra_listops",)
SPLITS = ("train", "validation", "test")

_MISSING = object()
_GENERATOR_DEFAULTS = {"num_train": 96_000, "num_val": 2_000, "num_test": 2_000,
                       "min_length": 500, "max_length": 2_000, "max_depth": 10, "max_args": 10,
                       "gen_seed": 0}


@dataclasses.dataclass
class Task:
  """A prepared classification task and the pipelines over it.

  Batches are those of `ssm.data.pipeline`: "tokens" int32 [batch, seq_len], "mask" bool
  [batch, seq_len], "label" int32 [batch], "weight" float32 [batch]; `batch` is the per-process
  batch (the global one divided by jax.process_count()).
  """

  name: str
  vocab_size: int
  num_classes: int
  seq_len: int
  split_sizes: dict[str, int]
  batch_size: int  # per process
  eval_batch_size: int  # per process
  seed: int
  truncate: bool
  builder: tfds.core.DatasetBuilder = dataclasses.field(repr=False)
  pad_id: int = listops.PAD_ID
  _sources: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def source(self, split: str):
    """The random-access source of a split: examples {"tokens": int32 [n], "label": int}."""
    if split not in self.split_sizes:
      raise ValueError(f"unknown split {split!r}; known splits: {', '.join(self.split_sizes)}")
    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(split)
    return self._sources[split]

  def train_iterator(self) -> pipeline.TrainIterator:
    """A fresh endless iterator over the train split (get_state()/set_state() for resume)."""
    return pipeline.train_iterator(self.source("train"), batch_size=self.batch_size,
                                   seq_len=self.seq_len, seed=self.seed, truncate=self.truncate)

  def eval_batches(self, split: str) -> pipeline.EvalBatches:
    """One pass over `split` ("validation" or "test"), filler examples weighted 0."""
    return pipeline.eval_batches(self.source(split), batch_size=self.eval_batch_size,
                                 seq_len=self.seq_len, truncate=self.truncate)

  def label_counts(self, split: str) -> np.ndarray:
    """Examples per class in `split`, int64 [num_classes]."""
    counts = (self.builder.info.metadata or {}).get("label_counts", {}).get(split)
    if counts is None:  # a dataset written without the metadata: count by reading it
      src = self.source(split)
      counts = np.bincount([int(src[i]["label"]) for i in range(len(src))],
                           minlength=self.num_classes)
    return np.asarray(counts, dtype=np.int64)

  def majority_rate(self, split: str) -> float:
    """Accuracy of always predicting the most frequent class of `split`."""
    counts = self.label_counts(split)
    return float(counts.max() / max(counts.sum(), 1))


def _field(cfg: Any, name: str, default: Any = _MISSING) -> Any:
  if isinstance(cfg, Mapping):
    value = cfg.get(name, default)
  else:
    value = getattr(cfg, name, default)
  if value is _MISSING:
    raise ConfigError(f"data.{name}", "missing")
  return value


def _int(cfg: Any, name: str, low: int, default: Any = _MISSING) -> int:
  value = _field(cfg, name, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ConfigError(f"data.{name}", f"must be an integer >= {low}, got {value!r}")
  return int(value)


def _path(cfg: Any, name: str) -> str | None:
  value = _field(cfg, name, None)
  if value is not None and not isinstance(value, (str, os.PathLike)):
    raise ConfigError(f"data.{name}", f"must be a path or None, got {value!r}")
  return None if value is None else os.fspath(value)


def _builder_config(cfg: Any) -> tuple[LraListopsConfig, str | None]:
  manual_dir = _path(cfg, "manual_dir")
  if manual_dir is not None:
    return LraListopsConfig.release(), manual_dir
  gen = {k: _int(cfg, k, 0 if k in ("min_length", "gen_seed") else 1, default)
         for k, default in _GENERATOR_DEFAULTS.items()}
  for k in ("max_depth", "max_args"):
    if gen[k] < 2:
      raise ConfigError(f"data.{k}", f"must be >= 2, got {gen[k]}")
  if gen["max_length"] <= max(gen["min_length"] + 1, 4):
    raise ConfigError("data.max_length",
                      f"no token count n satisfies data.min_length={gen['min_length']} < n < "
                      f"data.max_length={gen['max_length']} (the smallest expression has 4)")
  biggest = listops.max_possible_tokens(gen["max_depth"], gen["max_args"])
  if biggest <= gen["min_length"]:
    raise ConfigError("data.min_length",
                      f"{gen['min_length']} is unreachable: the largest expression with "
                      f"data.max_depth={gen['max_depth']}, data.max_args={gen['max_args']} has "
                      f"{biggest} tokens")
  p = _field(cfg, "operator_prob", None)
  if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                        or not 0 < p <= 1):
    raise ConfigError("data.operator_prob", f"must be in (0, 1] or None, got {p!r}")
  config = LraListopsConfig.generated(
      num_train=gen["num_train"], num_val=gen["num_val"], num_test=gen["num_test"],
      min_length=gen["min_length"], max_length=gen["max_length"], max_depth=gen["max_depth"],
      max_args=gen["max_args"], seed=gen["gen_seed"], operator_prob=p)
  return config, None


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if jax.process_count() == 1:
    builder.download_and_prepare(download_config=download_config)
    return
  # Process 0 writes; the others then find it (shared data_dir) or, on a local disk, write the
  # same deterministic dataset themselves.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    builder.download_and_prepare(download_config=download_config)
  multihost_utils.sync_global_devices("ssm.data.tasks.prepare")
  if jax.process_index() != 0:
    builder.download_and_prepare(download_config=download_config)


def load_task(data_cfg: Any, *, seed: int) -> Task:
  """Validates `data_cfg`, writes the dataset if needed, and returns the Task.

  Every configuration error is a ConfigError naming the field (e.g. "data.seq_len").
  """
  name = _field(data_cfg, "name")
  if name not in TASK_NAMES:
    raise ConfigError("data.name", f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
  seq_len = _int(data_cfg, "seq_len", 1)
  batch_size = _int(data_cfg, "batch_size", 1)
  eval_batch_size = _int(data_cfg, "eval_batch_size", 1, batch_size)
  truncate = _field(data_cfg, "truncate", False)
  if not isinstance(truncate, bool):
    raise ConfigError("data.truncate", f"must be True or False, got {truncate!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  processes = jax.process_count()
  for field, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if size % processes:
      raise ConfigError(f"data.{field}", f"{size} does not divide over {processes} processes")
  data_dir = _path(data_cfg, "data_dir")

  config, manual_dir = _builder_config(data_cfg)
  builder = LraListops(config=config, data_dir=data_dir, file_format="array_record")
  _prepare(builder, manual_dir)

  split_sizes = {s: int(builder.info.splits[s].num_examples) for s in SPLITS}
  max_tokens = (builder.info.metadata or {}).get("max_num_tokens", {})
  if not truncate:
    for split, longest in max_tokens.items():
      if longest > seq_len:
        raise ConfigError("data.seq_len",
                          f"{seq_len} is shorter than the longest {split} example ({longest} "
                          f"tokens); raise data.seq_len or set data.truncate=True")
  return Task(name=name, vocab_size=listops.VOCAB_SIZE, num_classes=listops.NUM_CLASSES,
              seq_len=seq_len, split_sizes=split_sizes, batch_size=batch_size // processes,
              eval_batch_size=eval_batch_size // processes, seed=int(seed), truncate=truncate,
              builder=builder)
