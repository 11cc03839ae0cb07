"""TFDS builder `lra_pathfinder`: LRA Pathfinder (32x32) and Path-X (128x128), generated or read
from the LRA release; task "lra_pathfinder".

Two kinds of config (a `LraPathfinderConfig`):
- `LraPathfinderConfig.generated(size=, difficulty=, num_train=, num_val=, num_test=, seed=)`
  draws images with `ssm.data.pathfinder` (example i of the stream is `pathfinder.generate`'s
  example i); the name spells out every setting (e.g. "gen_size32_hard_n160000-20000-20000_seed0")
  so different settings land in different `data_dir` subfolders. One stream is cut into train,
  validation and test in that order. Large configs sample in worker processes (all CPUs; the
  result does not depend on how many); a 32x32 "hard" image takes 25-45 ms on one core.
- `LraPathfinderConfig.release(size=, difficulty=)` (e.g. "release_size32_hard") reads the LRA
  release under the manual directory: `<manual_dir>/pathfinder<size>/<curv_...>/metadata/*.npy`
  and the PNGs they name (see `pathfinder.release_entries`). The release has no split: the rows
  are split 80/10/10 (train/validation/test) by a permutation seeded with RELEASE_SPLIT_SEED, as
  S4 does. Unreadable images (missing, empty, not a PNG, wrong size) are skipped and counted
  (metadata "skipped" per split, and a logged warning naming the first one), so a split can be a
  few short of its share.

Features: "image" uint8 `[size, size]` (stored as raw bytes), "label" 0/1 (1: the markers are
on one path). Splits: "train", "validation", "test". Metadata (`builder.info.metadata`):
"max_num_tokens" (size * size) and "label_counts" per split; "skipped" per split for release
configs. Written as array_record (TensorFlow is not needed) and read with `as_data_source`.

The task's examples (`load`) are the images read row by row (`encode_pixels`): pixels "tokens"
gives "tokens" int32 [size * size] (pixel + 1, ids 1..256, vocab 257); "continuous" gives
float32 [size * size, 1] = (pixel / 255 - 0.5) / 0.5 in [-1, 1] (vocab 0, d_input 1).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ssm.config import ConfigError
from ssm.data import pathfinder as pf
from ssm.data.prepared import (MappedSource, Prepared, TaskSpec, prepare_builder, setting_choice,
                               setting_int)

SPLITS = ("train", "validation", "test")
PIXEL_MODES = ("tokens", "continuous")
RELEASE_SPLIT_SEED = 42
RELEASE_FRACTIONS = (0.8, 0.1)  # train, validation; test gets the rest
# Generated splits with at least this many examples sample their scenes in worker processes.
PARALLEL_MIN_EXAMPLES = 2_000
_CHUNK = 32  # examples per task sent to a worker

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Pixels as model inputs (shared with ssm.data.lra_image).


def encode_pixels(image: np.ndarray, pixels: str) -> np.ndarray:
  """A grayscale image uint8 [H, W] read row by row: "tokens" -> int32 [H * W] (pixel + 1, see
  `pathfinder.to_tokens`), "continuous" -> float32 [H * W, 1] = (pixel / 255 - 0.5) / 0.5."""
  image = np.asarray(image, dtype=np.uint8)
  if pixels == "tokens":
    return image.reshape(-1).astype(np.int32) + pf.PIXEL_OFFSET
  if pixels == "continuous":
    return (image.reshape(-1, 1).astype(np.float32) / 255.0 - 0.5) / 0.5
  raise ValueError(f"pixels must be one of {PIXEL_MODES}, got {pixels!r}")


def _pixel_example(example: Mapping[str, Any], pixels: str, gray=None) -> dict[str, Any]:
  image = example["image"] if gray is None else gray(example["image"])
  return {"tokens": encode_pixels(image, pixels), "label": int(example["label"])}


def pixel_source(source: Sequence, pixels: str, gray=None) -> MappedSource:
  """Examples {"image", "label"} -> {"tokens": encode_pixels(image), "label": int}, read lazily;
  `gray` (optional) first turns the stored image into a grayscale uint8 [H, W]."""
  if pixels not in PIXEL_MODES:
    raise ValueError(f"pixels must be one of {PIXEL_MODES}, got {pixels!r}")
  return MappedSource(source, functools.partial(_pixel_example, pixels=pixels, gray=gray))


def pixel_vocab(pixels: str) -> dict[str, int]:
  """Prepared's vocab_size and d_input for a pixel mode."""
  return ({"vocab_size": pf.VOCAB_SIZE, "d_input": 0} if pixels == "tokens"
          else {"vocab_size": 0, "d_input": 1})


# ----------------------------------------------------------------------------------------------
# Generation.


def _sample(settings: pf.Settings, seed: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples lo..hi-1 of the stream: images uint8 [n, S, S], labels int32 [n]."""
  images = np.zeros((hi - lo, settings.size, settings.size), dtype=np.uint8)
  labels = np.zeros((hi - lo,), dtype=np.int32)
  for k, i in enumerate(range(lo, hi)):
    scene = pf.sample_scene(pf.example_rng(seed, i), settings)
    images[k] = pf.render(scene, size=settings.size, line_width=settings.line_width,
                          marker_radius=settings.marker_radius)
    labels[k] = scene.label
  return images, labels


def generate_range(settings: pf.Settings, seed: int, start: int, stop: int,
                   workers: int = 1) -> Iterator[tuple[np.ndarray, int]]:
  """(image uint8 [S, S], label) of examples start..stop-1 of `pathfinder.generate(...,
  seed=seed)` with these settings, in order. workers > 1 draws them in that many processes
  (started with "spawn", safe beside JAX's threads; the main module must be importable, as for
  any spawn pool). Same result either way."""
  los = range(start, stop, _CHUNK)
  if workers <= 1:
    chunks = (_sample(settings, seed, lo, min(lo + _CHUNK, stop)) for lo in los)
    for images, labels in chunks:
      yield from zip(images, labels.tolist())
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    block = 4 * workers  # chunks per block
    pending = iter(())
    for b in range(0, len(los), block):
      starts = los[b:b + block]
      # Submitted now, consumed after the previous block: the workers never wait on us, and at
      # most two blocks are held.
      chunks = pool.map(_sample, itertools.repeat(settings), itertools.repeat(seed), starts,
                        [min(lo + _CHUNK, stop) for lo in starts])
      for images, labels in pending:
        yield from zip(images, labels.tolist())
      pending = chunks
    for images, labels in pending:
      yield from zip(images, labels.tolist())


def _num_workers(num_examples: int) -> int:
  if num_examples < PARALLEL_MIN_EXAMPLES:
    return 1
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cpus or 1, num_examples // (4 * _CHUNK)))


# ----------------------------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass(eq=False)
class LraPathfinderConfig(tfds.core.BuilderConfig):
  """Where the images come from; build with `generated(...)` or `release(...)`."""

  source: str = "generate"  # "generate" or "release"
  size: int = 32
  difficulty: str = "hard"
  num_train: int = 160_000
  num_val: int = 20_000
  num_test: int = 20_000
  seed: int = 0

  @classmethod
  def generated(cls, *, size: int = 32, difficulty: str = "hard", num_train: int = 160_000,
                num_val: int = 20_000, num_test: int = 20_000,
                seed: int = 0) -> LraPathfinderConfig:
    """Generated images; bad settings raise ValueError naming the argument."""
    pf.resolve_settings(size=size, difficulty=difficulty)
    for field, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                              ("num_test", num_test, 1), ("seed", seed, 0)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
    name = f"gen_size{size}_{difficulty}_n{num_train}-{num_val}-{num_test}_seed{seed}"
    return _intern(cls(name=name, source="generate", size=int(size), difficulty=difficulty,
                       num_train=int(num_train), num_val=int(num_val), num_test=int(num_test),
                       seed=int(seed),
                       description=f"{size}x{size} {difficulty} images from "
                                   "ssm.data.pathfinder.generate"))

  @classmethod
  def release(cls, *, size: int = 32, difficulty: str = "hard") -> LraPathfinderConfig:
    """The LRA release folder pathfinder<size>/<RELEASE_DIRS[difficulty]> under manual_dir."""
    if difficulty not in pf.DIFFICULTIES:
      raise ValueError(f"difficulty must be one of {sorted(pf.DIFFICULTIES)}, "
                       f"got {difficulty!r}")
    pf.release_dir(".", size, difficulty)  # validates size
    return _intern(cls(name=f"release_size{size}_{difficulty}", source="release", size=int(size),
                       difficulty=difficulty,
                       description=f"LRA release pathfinder{size}/"
                                   f"{pf.RELEASE_DIRS[difficulty]} from manual_dir"))


# TFDS accepts a config object whose name matches one of BUILDER_CONFIGS only if it is that very
# object; the name spells out every setting, so one object per name is the same dataset.
_CONFIGS: dict[str, LraPathfinderConfig] = {}


def _intern(config: LraPathfinderConfig) -> LraPathfinderConfig:
  return _CONFIGS.setdefault(config.name, config)


def release_split(num_rows: int) -> dict[str, np.ndarray]:
  """Row indices of each split of a release folder with `num_rows` metadata rows: a permutation
  seeded with RELEASE_SPLIT_SEED, cut 80/10/10 (int(0.8 n), int(0.1 n), the rest)."""
  perm = np.random.default_rng(RELEASE_SPLIT_SEED).permutation(num_rows)
  n_train = int(num_rows * RELEASE_FRACTIONS[0])
  n_val = int(num_rows * RELEASE_FRACTIONS[1])
  return {"train": perm[:n_train], "validation": perm[n_train:n_train + n_val],
          "test": perm[n_train + n_val:]}


class LraPathfinder(tfds.core.GeneratorBasedBuilder):
  """Pathfinder / Path-X (Long Range Arena): are the two markers on the same path?"""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Clean-room generator or the LRA release images."}
  BUILDER_CONFIGS = [LraPathfinderConfig.generated(), LraPathfinderConfig.release()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "For release configs, the manual directory is the LRA release folder (lra_release/) that "
      "holds pathfinder32/, pathfinder128/, ... with <curv_folder>/metadata/*.npy and "
      "<curv_folder>/imgs/. Generated configs need no files.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup probes `importlib_resources` (not installed here) for builders that live
    # in a package; this file is the path it would find.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(num_classes=pf.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        # Keep the order (generated example i, or the permuted release rows); training shuffles
        # in the grain pipeline.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/google-research/long-range-arena",
        citation=("@inproceedings{linsley2018learning, title={Learning long-range spatial "
                  "dependencies with horizontal gated recurrent units}, author={Linsley, Drew "
                  "and others}, booktitle={NeurIPS}, year={2018}}"),
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
            f"lra_pathfinder/{cfg.name} needs the LRA release folder (holding "
            f"pathfinder{cfg.size}/{pf.RELEASE_DIRS[cfg.difficulty]}) as the manual "
            f"directory: {e}") from None
      entries = pf.release_entries(manual_dir, cfg.size, cfg.difficulty)
      if not entries:
        raise ValueError(f"no metadata rows in "
                         f"{pf.release_dir(manual_dir, cfg.size, cfg.difficulty) / 'metadata'}")
      meta["skipped"] = {}
      return {split: self._generate_examples(split, self._read(split, [entries[i] for i in rows]))
              for split, rows in release_split(len(entries)).items()}
    if cfg.source != "generate":
      raise ValueError(f"LraPathfinderConfig.source must be 'release' or 'generate', "
                       f"got {cfg.source!r}")
    settings = pf.resolve_settings(size=cfg.size, difficulty=cfg.difficulty)
    sizes = {"train": cfg.num_train, "validation": cfg.num_val, "test": cfg.num_test}
    starts = dict(zip(SPLITS, np.cumsum([0] + [sizes[s] for s in SPLITS]).tolist()))
    return {split: self._generate_examples(split, generate_range(
                settings, cfg.seed, starts[split], starts[split] + sizes[split],
                workers=_num_workers(sizes[split])))
            for split in SPLITS}

  def _read(self, split: str, entries: list[tuple[epath.Path, int]]):
    size = self.builder_config.size
    skipped, first = 0, None
    for path, label in entries:
      image = pf.load_image(path, size)
      if image is None:
        skipped += 1
        first = first or path
        continue
      yield image, label
    self.info.metadata["skipped"][split] = skipped
    if skipped:
      log.warning("lra_pathfinder/%s: skipped %d of %d %s images that could not be read as "
                      "%dx%d grayscale (first: %s)", self.builder_config.name, skipped,
                      len(entries), split, size, size, first)

  def _generate_examples(self, split: str, examples: Iterator[tuple[np.ndarray, int]]):
    counts = [0] * pf.NUM_CLASSES
    for i, (image, label) in enumerate(examples):
      counts[label] += 1
      yield i, {"image": image, "label": int(label)}
    # Runs when the split is fully written, before DatasetInfo (and this metadata) is saved.
    self.info.metadata["label_counts"][split] = counts
    self.info.metadata["max_num_tokens"][split] = self.builder_config.size ** 2


# ----------------------------------------------------------------------------------------------
# The task.


def load(settings: Mapping[str, Any], *, data_dir: str | None,
         manual_dir: str | None) -> Prepared:
  """The "lra_pathfinder" task (see the module docstring); manual_dir None: generate."""
  size = setting_int(settings, "size", 8)
  difficulty = setting_choice(settings, "difficulty", tuple(pf.DIFFICULTIES))
  pixels = setting_choice(settings, "pixels", PIXEL_MODES)
  if manual_dir is None:
    counts = {k: setting_int(settings, k, 1) for k in ("num_train", "num_val", "num_test")}
    seed = setting_int(settings, "gen_seed", 0)
    try:
      pf.resolve_settings(size=size, difficulty=difficulty)
    except ValueError as e:
      raise ConfigError("data.size", str(e)) from None
    config = LraPathfinderConfig.generated(size=size, difficulty=difficulty, seed=seed, **counts)
  else:
    config = LraPathfinderConfig.release(size=size, difficulty=difficulty)
  builder = LraPathfinder(config=config, data_dir=data_dir, file_format="array_record")
  prepare_builder(builder, manual_dir)
  metadata = builder.info.metadata or {}
  return Prepared(kind="classify", num_classes=pf.NUM_CLASSES,
                  sources={s: pixel_source(builder.as_data_source(s), pixels) for s in SPLITS},
                  max_num_tokens=metadata.get("max_num_tokens"),
                  label_counts=metadata.get("label_counts"), **pixel_vocab(pixels))


TASK_SPECS = {
    "lra_pathfinder": TaskSpec(
        kind="classify",
        fields={"size": 32, "difficulty": "hard", "num_train": 160_000, "num_val": 20_000,
                "num_test": 20_000, "gen_seed": 0, "pixels": "tokens"},
        load=load,
        description="Pathfinder (size 32) / Path-X (size 128): are the two markers on one "
                    "path? Generated, or the LRA release from manual_dir (80/10/10 split)."),
}
