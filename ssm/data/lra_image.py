"""Task "lra_image": LRA Image, CIFAR-10 as grayscale pixel sequences (10 classes).

Reads the TFDS `cifar10` dataset (prepared beforehand as array_record in data_dir, e.g.
`tfds build cifar10 --data_dir DIR --file_format=array_record`; nothing is downloaded here)
through `tfds.data_source`, and maps each example when it is read (no dataset of our own):

  grayscale  ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B, rounded to uint8 [32, 32]
  pixels     "tokens": "tokens" int32 [1024] = pixel + 1 row by row (ids 1..256, vocab 257);
             "continuous": float32 [1024, 1] = (pixel / 255 - 0.5) / 0.5 (vocab 0, d_input 1)
             (`lra_pathfinder.encode_pixels`)
  label      int 0..9

Splits: "validation" is `num_val` examples of cifar10's train split picked by a permutation
seeded with VAL_SPLIT_SEED, "train" the other train examples, "test" cifar10's test split
(10000). Both index lists are sorted, so reads go in file order; training shuffles anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data.lra_pathfinder import PIXEL_MODES, pixel_source, pixel_vocab
from ssm.data.prepared import Prepared, SubsetSource, TaskSpec, setting_choice, setting_int

NUM_CLASSES = 10
IMAGE_SIZE = 32
VAL_SPLIT_SEED = 0
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def grayscale(image: np.ndarray) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> luma uint8 [H, W]: round(0.299 R + 0.587 G + 0.114 B)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  return np.clip(np.rint(image.astype(np.float64) @ LUMA), 0, 255).astype(np.uint8)


def validation_indices(num_train: int, num_val: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices into cifar10's train split, each sorted: validation is the
  first num_val of a permutation seeded with VAL_SPLIT_SEED."""
  perm = np.random.default_rng(VAL_SPLIT_SEED).permutation(num_train)
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def _cifar10(split: str, data_dir: str | None):
  try:
    return tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:
    # Unprepared (or prepared as tfrecord), TFDS says "Random access data source for file
    # format FileFormat.TFRECORD is not supported".
    where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets)"
    raise FileNotFoundError(
        f"lra_image needs TFDS cifar10 prepared as array_record in {where}; prepare it once on "
        f"a machine with internet access: `tfds build cifar10 --data_dir "
        f"{data_dir or '~/tensorflow_datasets'} --file_format=array_record` (or in Python: "
        f"tfds.builder('cifar10', data_dir=..., file_format='array_record')"
        f".download_and_prepare()). TFDS said: {e}") from e


def load(settings: Mapping[str, Any], *, data_dir: str | None,
         manual_dir: str | None) -> Prepared:
  """The "lra_image" task (see the module docstring)."""
  num_val = setting_int(settings, "num_val", 1)
  pixels = setting_choice(settings, "pixels", PIXEL_MODES)
  if manual_dir is not None:
    raise ConfigError("data.manual_dir", f"lra_image reads TFDS cifar10 from data.data_dir and "
                                         f"takes no manual_dir, got {manual_dir!r}")
  train, test = _cifar10("train", data_dir), _cifar10("test", data_dir)
  if num_val >= len(train):
    raise ConfigError("data.num_val", f"must be less than the {len(train)} examples of "
                                      f"cifar10's train split, got {num_val}")
  train_idx, val_idx = validation_indices(len(train), num_val)
  sources = {"train": SubsetSource(train, train_idx), "validation": SubsetSource(train, val_idx),
             "test": test}
  return Prepared(kind="classify", num_classes=NUM_CLASSES,
                  sources={s: pixel_source(src, pixels, grayscale) for s, src in sources.items()},
                  max_num_tokens={s: IMAGE_SIZE ** 2 for s in sources},
                  **pixel_vocab(pixels))


TASK_SPECS = {
    "lra_image": TaskSpec(
        kind="classify", fields={"num_val": 5_000, "pixels": "tokens"}, load=load,
        description="CIFAR-10 (TFDS cifar10) as 1024 grayscale pixels, 10 classes; validation "
                    "carved out of train."),
}
