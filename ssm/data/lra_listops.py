"""TFDS builder `lra_listops`: the LRA ListOps task, from the release files or from the generator.

Two kinds of config (a `LraListopsConfig`):
- `LraListopsConfig.release()` (name "release") reads the LRA release files `basic_train.tsv`,
  `basic_val.tsv`, `basic_test.tsv` (header `Source<TAB>Target`) from the manual directory
  (`tfds.download.DownloadConfig(manual_dir=...)`). The split index i is data row i of the file.
- `LraListopsConfig.generated(...)` runs `ssm.data.listops.generate`; the name spells out every
  setting (e.g. "gen_n96000-2000-2000_len500-2000_depth10_args10_p0.25_seed0"), so different
  settings land in different `data_dir` subfolders. One stream of distinct expressions is cut
  into train, validation and test in that order, so the splits never share an expression.

Features: "tokens" int32 `[num_tokens]` (ids of `listops.VOCAB`, no padding), "label" 0..9.
Splits: "train", "validation", "test". Metadata (`builder.info.metadata`): "max_num_tokens" and
"label_counts" per split, "operator_prob" for generated configs.

Written as array_record (pass `file_format="array_record"`; TensorFlow is not needed) and read
with `builder.as_data_source(split)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ssm.config import ConfigError
from ssm.data import listops
from ssm.data.prepared import (Prepared, TaskSpec, from_builder, prepare_builder, setting_float,
                               setting_int)

RELEASE_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv",
                 "test": "basic_test.tsv"}
SPLITS = tuple(RELEASE_FILES)


@dataclasses.dataclass(eq=False)
class LraListopsConfig(tfds.core.BuilderConfig):
  """Where the examples come from; build with `release()` or `generated(...)`."""

  source: str = "generate"  # "release" or "generate"
  num_train: int = 96_000
  num_val: int = 2_000
  num_test: int = 2_000
  min_length: int = 500
  max_length: int = 2_000
  max_depth: int = 10
  max_args: int = 10
  seed: int = 0
  operator_prob: float = listops.LRA_OPERATOR_PROB

  @classmethod
  def release(cls) -> LraListopsConfig:
    return _intern(cls(name="release", source="release",
                       description="LRA release files basic_{train,val,test}.tsv from "
                                   "manual_dir"))

  @classmethod
  def generated(cls, *, num_train: int = 96_000, num_val: int = 2_000, num_test: int = 2_000,
                min_length: int = 500, max_length: int = 2_000, max_depth: int = 10,
                max_args: int = 10, seed: int = 0,
                operator_prob: float | None = None) -> LraListopsConfig:
    """A generated dataset; operator_prob None -> `listops.auto_operator_prob`."""
    if operator_prob is None:
      operator_prob = listops.auto_operator_prob(min_length, max_depth, max_args)
    for field, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    # Fails early (at config time) on settings that admit no expression.
    listops.validate_settings(min_length, max_length, max_depth, max_args, operator_prob)
    name = (f"gen_n{num_train}-{num_val}-{num_test}_len{min_length}-{max_length}"
            f"_depth{max_depth}_args{max_args}_p{operator_prob:g}_seed{seed}")
    return _intern(cls(name=name, source="generate", num_train=num_train, num_val=num_val,
                       num_test=num_test, min_length=min_length, max_length=max_length,
                       max_depth=max_depth, max_args=max_args, seed=seed,
                       operator_prob=float(operator_prob),
                       description="ListOps expressions from ssm.data.listops.generate"))


# TFDS accepts a config object whose name matches one of BUILDER_CONFIGS only if it is that very
# object; the name spells out every setting, so one object per name is the same dataset.
_CONFIGS: dict[str, LraListopsConfig] = {}


def _intern(config: LraListopsConfig) -> LraListopsConfig:
  return _CONFIGS.setdefault(config.name, config)


def read_release_tsv(path: epath.PathLike) -> Iterator[tuple[np.ndarray, int]]:
  """Yields (tokens `[num_tokens]` int32, label) for each data row of a release TSV file.

  Raises FileNotFoundError naming `path` when it is missing, and ValueError naming the file and
  the 1-based line number on a bad header or a malformed row (column count, target not an
  integer in 0..9, unknown token, empty source).
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"LRA ListOps release file not found: {path}")
  with path.open("r") as f:
    header = f.readline().rstrip("\r\n")
    if header.split("\t") != ["Source", "Target"]:
      raise ValueError(f"{path}:1: expected the header 'Source<TAB>Target', got {header!r}")
    for lineno, line in enumerate(f, start=2):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue  # blank lines (e.g. a trailing one) carry no example
      cols = line.split("\t")
      if len(cols) != 2:
        raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns (Source, Target), "
                         f"got {len(cols)}")
      source, target = cols
      try:
        label = int(target)
      except ValueError:
        raise ValueError(f"{path}:{lineno}: target {target!r} is not an integer") from None
      if not 0 <= label < listops.NUM_CLASSES:
        raise ValueError(f"{path}:{lineno}: target {label} is outside 0..{listops.NUM_CLASSES - 1}")
      try:
        tokens = listops.tokenize(source)
      except ValueError as e:
        raise ValueError(f"{path}:{lineno}: {e}") from None
      if tokens.size == 0:
        raise ValueError(f"{path}:{lineno}: empty source expression")
      yield tokens, label


class LraListops(tfds.core.GeneratorBasedBuilder):
  """ListOps (Long Range Arena): classify the value 0..9 of a nested list expression."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Release TSV files or the clean-room generator."}
  BUILDER_CONFIGS = [LraListopsConfig.release(), LraListopsConfig.generated()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[1].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "For the 'release' config, place basic_train.tsv, basic_val.tsv and basic_test.tsv from "
      "the LRA release (lra_release/listops-1000/) in the manual directory. Generated configs "
      "need no files.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup probes `importlib_resources` (not installed here) for builders that live
    # in a package; this file is the path it would find.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "label": tfds.features.ClassLabel(num_classes=listops.NUM_CLASSES),
        }),
        supervised_keys=("tokens", "label"),
        # Keep file order: index i of a split is row i of its file (or generated example i),
        # which makes error messages traceable. Training shuffles in the grain pipeline.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/google-research/long-range-arena",
        citation=("@inproceedings{tay2021long, title={Long Range Arena: A Benchmark for "
                  "Efficient Transformers}, author={Tay, Yi and others}, booktitle={ICLR}, "
                  "year={2021}}"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    meta = self.info.metadata
    meta["max_num_tokens"] = {}
    meta["label_counts"] = {}
    if cfg.source == "release":
      try:
        manual_dir = dl_manager.manual_dir
      except (AssertionError, ValueError) as e:
        raise FileNotFoundError(
            f"lra_listops/release needs {', '.join(RELEASE_FILES.values())} in the manual "
            f"directory: {e}") from None
      paths = {split: manual_dir / fname for split, fname in RELEASE_FILES.items()}
      for path in paths.values():
        if not path.exists():
          raise FileNotFoundError(f"LRA ListOps release file not found: {path} (expected "
                                  f"{', '.join(RELEASE_FILES.values())} in {manual_dir})")
      return {split: self._generate_examples(split, read_release_tsv(path))
              for split, path in paths.items()}
    if cfg.source != "generate":
      raise ValueError(f"LraListopsConfig.source must be 'release' or 'generate', "
                       f"got {cfg.source!r}")
    meta["operator_prob"] = cfg.operator_prob
    sizes = {"train": cfg.num_train, "validation": cfg.num_val, "test": cfg.num_test}
    stream = listops.generate(
        sum(sizes.values()), min_length=cfg.min_length, max_length=cfg.max_length,
        max_depth=cfg.max_depth, max_args=cfg.max_args, seed=cfg.seed,
        operator_prob=cfg.operator_prob)
    # uint8 halves memory for the published size (~100 MB instead of ~400 MB as int32).
    held = {split: [(tokens.astype(np.uint8), label) for tokens, label in
                    (next(stream) for _ in range(n))] for split, n in sizes.items()}
    return {split: self._generate_examples(split, iter(examples))
            for split, examples in held.items()}

  def _generate_examples(self, split: str, examples: Iterator[tuple[np.ndarray, int]]):
    counts = [0] * listops.NUM_CLASSES
    max_tokens = 0
    for i, (tokens, label) in enumerate(examples):
      counts[label] += 1
      max_tokens = max(max_tokens, int(tokens.size))
      yield i, {"tokens": tokens.astype(np.int32), "label": int(label)}
    # Runs when the split is fully written, before DatasetInfo (and this metadata) is saved.
    self.info.metadata["label_counts"][split] = counts
    self.info.metadata["max_num_tokens"][split] = max_tokens


# The `config.data` settings of the task (see ssm.data.prepared): the generator's, used when
# `data.manual_dir` is None.
FIELDS = {"num_train": 96_000, "num_val": 2_000, "num_test": 2_000, "min_length": 500,
          "max_length": 2_000, "max_depth": 10, "max_args": 10, "gen_seed": 0,
          "operator_prob": None}


def builder_config(settings: Mapping[str, Any], manual_dir: str | None) -> LraListopsConfig:
  """The builder config of `settings` (FIELDS): the release files, or the generator's settings
  checked with ConfigErrors naming the field."""
  if manual_dir is not None:
    return LraListopsConfig.release()
  gen = {k: setting_int(settings, k, 0 if k in ("min_length", "gen_seed") else 1)
         for k in FIELDS if k != "operator_prob"}
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
  p = settings["operator_prob"]
  if p is not None:
    p = setting_float(settings, "operator_prob", 0.0, 1.0)
    if p == 0:
      raise ConfigError("data.operator_prob", "must be in (0, 1] or None, got 0")
  return LraListopsConfig.generated(
      num_train=gen["num_train"], num_val=gen["num_val"], num_test=gen["num_test"],
      min_length=gen["min_length"], max_length=gen["max_length"], max_depth=gen["max_depth"],
      max_args=gen["max_args"], seed=gen["gen_seed"], operator_prob=p)


def load(settings: Mapping[str, Any], *, data_dir: str | None,
         manual_dir: str | None) -> Prepared:
  """Writes the dataset under data_dir once (release files from manual_dir, else generated)."""
  builder = LraListops(config=builder_config(settings, manual_dir), data_dir=data_dir,
                       file_format="array_record")
  prepare_builder(builder, manual_dir)
  return from_builder(builder, kind="classify", vocab_size=listops.VOCAB_SIZE,
                      num_classes=listops.NUM_CLASSES)


TASK_SPECS = {"lra_listops": TaskSpec(
    kind="classify", fields=FIELDS, load=load,
    description="LRA ListOps: the value 0..9 of a nested list expression (release or generated)")}
