"""TFDS builder `lra_retrieval` and task `lra_retrieval`: LRA Retrieval, AAN document pairs.

The builder reads the LRA release files (lra_release.gz from
https://github.com/google-research/long-range-arena, folder `lra_release/tsv_data/`) from the
manual directory (`tfds.download.DownloadConfig(manual_dir=...)`, the task's data.manual_dir):

  new_aan_pairs.train.tsv -> "train", new_aan_pairs.eval.tsv -> "validation",
  new_aan_pairs.test.tsv -> "test"

Each line is `label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`, with no header and no quoting (LRA
reads them with `header=False, use_quote_delim=False`); the label is 0 or 1, possibly written
as a float ("1.0"); blank lines are skipped. The text columns are taken as they stand (in the
release they are spelled as Python bytes literals, b'...', and LRA's and S4's byte pipelines
encode that spelling as is), and encoded by `lra_text.encode_bytes`: token = byte + 1, ids
1..256, vocab 257, 0 = padding, each document cut to its first `max_length` bytes.

Features: "tokens" int32 `[<= max_length]` (text1), "tokens2" int32 `[<= max_length]` (text2),
"label" 0/1 (1: the papers are linked by a citation). Split index i is data line i of its file.
Metadata: "max_num_tokens" (longest document of either column) and "label_counts" per split.
The builder config is named "bytes_len<max_length>", so each max_length has its own folder.
Stored as array_record with zlib-compressed token arrays (~0.6 bytes per token on text, against
~1 for TFDS's default varint encoding; reading them costs about the same).

Task `lra_retrieval` (kind "retrieval", 2 classes), field max_length (default 4000, as LRA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ssm.data.lra_text import VOCAB_SIZE, encode_bytes
from ssm.data.prepared import Prepared, TaskSpec, from_builder, prepare_builder, setting_int

RELEASE_FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
                 "test": "new_aan_pairs.test.tsv"}
NUM_CLASSES = 2
DEFAULT_MAX_LENGTH = 4000
_WHERE = ("they are in the LRA release lra_release.gz "
          "(https://github.com/google-research/long-range-arena), folder lra_release/tsv_data/")


@dataclasses.dataclass(eq=False)
class LraRetrievalConfig(tfds.core.BuilderConfig):
  """Bytes kept per document; build with `make(max_length)`."""

  max_length: int = DEFAULT_MAX_LENGTH

  @classmethod
  def make(cls, max_length: int = DEFAULT_MAX_LENGTH) -> LraRetrievalConfig:
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
        or max_length < 1:
      raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    return _intern(cls(name=f"bytes_len{max_length}", max_length=int(max_length),
                       description=f"AAN pairs as UTF-8 bytes, first {max_length} per document"))


# As in lra_listops: TFDS accepts a config whose name is one of BUILDER_CONFIGS only if it is
# that very object, and the name spells out every setting.
_CONFIGS: dict[str, LraRetrievalConfig] = {}


def _intern(config: LraRetrievalConfig) -> LraRetrievalConfig:
  return _CONFIGS.setdefault(config.name, config)


def read_pairs_tsv(path: epath.PathLike, max_length: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Yields (tokens of text1, tokens of text2, label) for each data line of an AAN pairs file.

  Raises FileNotFoundError naming `path` when it is missing, and ValueError naming the file and
  the 1-based line number on a malformed line (not 5 tab-separated columns, label not 0 or 1).
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"LRA Retrieval file not found: {path} ({_WHERE})")
  with path.open("rb") as f:  # bytes: the documents are encoded as they are in the file
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip(b"\r\n")
      if not line.strip():
        continue
      cols = line.split(b"\t")
      if len(cols) != 5:
        raise ValueError(f"{path}:{lineno}: expected 5 tab-separated columns (label, id1, id2, "
                         f"text1, text2), got {len(cols)}")
      try:
        value = float(cols[0])
      except ValueError:
        value = None
      if value not in (0.0, 1.0):
        raise ValueError(f"{path}:{lineno}: label {cols[0].decode('utf-8', 'replace')!r} is "
                         f"not 0 or 1")
      yield encode_bytes(cols[3], max_length), encode_bytes(cols[4], max_length), int(value)


class LraRetrieval(tfds.core.GeneratorBasedBuilder):
  """Retrieval (Long Range Arena): do two AAN papers cite one another, from their bytes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "LRA release new_aan_pairs.{train,eval,test}.tsv as bytes."}
  BUILDER_CONFIGS = [LraRetrievalConfig.make()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Place {', '.join(RELEASE_FILES.values())} in the manual directory; {_WHERE}.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # As in lra_listops: TFDS's own lookup needs `importlib_resources`, not installed here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    tokens = tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                  encoding=tfds.features.Encoding.ZLIB)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tokens, "tokens2": tokens,
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        disable_shuffling=True,  # index i is line i of the file; the pipeline shuffles
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/google-research/long-range-arena",
        citation=("@inproceedings{tay2021long, title={Long Range Arena: A Benchmark for "
                  "Efficient Transformers}, author={Tay, Yi and others}, booktitle={ICLR}, "
                  "year={2021}}"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    meta = self.info.metadata
    meta["max_num_tokens"] = {}
    meta["label_counts"] = {}
    try:
      manual_dir = dl_manager.manual_dir
    except (AssertionError, ValueError) as e:
      raise FileNotFoundError(f"lra_retrieval needs its manual directory (data.manual_dir): "
                              f"{e}") from None
    paths = {split: manual_dir / fname for split, fname in RELEASE_FILES.items()}
    for path in paths.values():
      if not path.exists():
        raise FileNotFoundError(f"LRA Retrieval file not found: {path} (expected "
                                f"{', '.join(RELEASE_FILES.values())} in the manual directory "
                                f"{manual_dir}, data.manual_dir; {_WHERE})")
    max_length = self.builder_config.max_length
    return {split: self._generate_examples(split, read_pairs_tsv(path, max_length))
            for split, path in paths.items()}

  def _generate_examples(self, split: str, pairs: Iterator[tuple[np.ndarray, np.ndarray, int]]):
    counts = [0] * NUM_CLASSES
    max_tokens = 0
    for i, (tokens, tokens2, label) in enumerate(pairs):
      counts[label] += 1
      max_tokens = max(max_tokens, tokens.size, tokens2.size)
      yield i, {"tokens": tokens, "tokens2": tokens2, "label": label}
    # Runs when the split is fully written, before DatasetInfo (and this metadata) is saved.
    self.info.metadata["label_counts"][split] = counts
    self.info.metadata["max_num_tokens"][split] = int(max_tokens)


def load(settings: Mapping[str, Any], *, data_dir: str | None,
         manual_dir: str | None) -> Prepared:
  """Writes lra_retrieval for data.max_length once (from manual_dir) and returns its splits."""
  max_length = setting_int(settings, "max_length")
  builder = LraRetrieval(config=LraRetrievalConfig.make(max_length), data_dir=data_dir,
                         file_format="array_record")
  prepare_builder(builder, manual_dir)
  return from_builder(builder, kind="retrieval", vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES,
                      unit="byte")


TASK_SPECS = {
    "lra_retrieval": TaskSpec(
        kind="retrieval", fields={"max_length": DEFAULT_MAX_LENGTH}, load=load,
        description="LRA Retrieval: do two AAN papers cite one another (UTF-8 byte tokens of "
                    "both, from the LRA release TSV files in data.manual_dir)"),
}
