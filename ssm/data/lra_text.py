"""Task `lra_text`: the LRA Text task, IMDB reviews classified from their UTF-8 bytes.

Reviews come from the TFDS dataset `imdb_reviews` (features "text" bytes, "label" 0 = neg,
1 = pos; 25,000 train and 25,000 test reviews), read with `tfds.data_source`, so it must have been
prepared once as array_record in `data_dir` (it needs a download of ~80 MB):

  tfds build imdb_reviews --data_dir DATA_DIR --file_format=array_record

Each review is encoded when it is read: token = byte + 1 (`BYTE_OFFSET`), so ids are 1..256 and
`VOCAB_SIZE` = 257 with 0 left for padding; only the first `max_length` bytes are kept (4096 as
in LRA; truncation may cut a multi-byte character, as LRA's byte encoder does).

Examples: "tokens" int32 `[min(num_bytes, max_length)]`, "label" 0/1.
Splits: "test" is the IMDB test split (what LRA reports). "validation" is `num_val` reviews of
the IMDB train split chosen by a fixed permutation (seed `VAL_SEED`) and "train" the other ones,
each in file order; `num_val` = 0 makes "validation" the test split and trains on all 25,000
reviews, as LRA and S4 do.

Fields: max_length (default 4096), num_val (default 2500, a tenth of the train split).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data.prepared import (MappedSource, Prepared, SubsetSource, TaskSpec, setting_int)

BYTE_OFFSET = 1
VOCAB_SIZE = 256 + BYTE_OFFSET
NUM_CLASSES = 2
VAL_SEED = 0
TFDS_NAME = "imdb_reviews"


def encode_bytes(text: str | bytes | np.ndarray, max_length: int) -> np.ndarray:
  """The first `max_length` UTF-8 bytes of `text` as int32 tokens byte + 1, `[<= max_length]`.

  `text` may be str (encoded as UTF-8), bytes, or a 0-d numpy array holding either.
  """
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, str):
    text = text.encode("utf-8")
  if not isinstance(text, bytes):
    raise TypeError(f"encode_bytes expects str or bytes, got {type(text).__name__}")
  return np.frombuffer(text[:max_length], dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def _imdb_source(split: str, data_dir: str | None):
  """`tfds.data_source` of one imdb_reviews split, with the command to prepare it if it is not."""
  try:
    return tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError) as e:
    # TFDS says "Random access data source for file format FileFormat.TFRECORD is not
    # supported" both when nothing is prepared and when it was prepared as tfrecord.
    where = data_dir or tfds.core.constants.DATA_DIR
    raise FileNotFoundError(
        f"lra_text reads the TFDS dataset {TFDS_NAME} as array_record from {where}, and it is not "
        f"prepared there (or only as tfrecord). Prepare it once (downloads ~80 MB): "
        f"`tfds build {TFDS_NAME} --data_dir {where} --file_format=array_record` (the tfds "
        f"command needs TensorFlow; without it run `python -c \"import tensorflow_datasets as "
        f"tfds; tfds.builder('{TFDS_NAME}', data_dir='{where}', file_format='array_record')"
        f".download_and_prepare()\"`)") from e


def load(settings: Mapping[str, Any], *, data_dir: str | None,
         manual_dir: str | None = None) -> Prepared:
  """The lra_text splits over the prepared imdb_reviews of `data_dir` (see the module doc)."""
  del manual_dir  # imdb_reviews comes from TFDS
  max_length = setting_int(settings, "max_length")
  num_val = setting_int(settings, "num_val", low=0)
  imdb_train = _imdb_source("train", data_dir)
  imdb_test = _imdb_source("test", data_dir)
  n = len(imdb_train)
  if num_val >= n:
    raise ConfigError("data.num_val", f"must be smaller than the {n} reviews of the "
                      f"imdb_reviews train split, got {num_val}")

  def encode(example):
    return {"tokens": encode_bytes(example["text"], max_length),
            "label": int(np.asarray(example["label"]))}

  train, test = MappedSource(imdb_train, encode), MappedSource(imdb_test, encode)
  if num_val:
    perm = np.random.default_rng(VAL_SEED).permutation(n)
    validation = SubsetSource(train, np.sort(perm[:num_val]))
    train = SubsetSource(train, np.sort(perm[num_val:]))
  else:
    validation = test
  return Prepared(kind="classify", vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES,
                  sources={"train": train, "validation": validation, "test": test}, unit="byte")


TASK_SPECS = {
    "lra_text": TaskSpec(
        kind="classify", fields={"max_length": 4096, "num_val": 2500}, load=load,
        description="LRA Text: IMDB reviews (TFDS imdb_reviews) as UTF-8 byte tokens, "
                    "positive or negative"),
}
