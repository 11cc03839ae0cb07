"""Byte-level language-modelling corpora as token streams (`TokenStream`), one per split.

Tokens: 0 padding (never in a stream), 1 document boundary (between two documents, not at the
ends), byte b -> b + 2; VOCAB_SIZE = 258; one token is one byte (unit "byte", so the loss in
bits per token is bits per byte).

Tasks (kind "lm"):
  text_folder  every regular file under `data.path` (a folder, searched recursively) whose
               relative path matches `data.glob` (default "**/*.txt"; "**/*" takes every file),
               one document per file, in the order of their relative paths. Files are split by
               a hash (sha1) of their relative path, so adding files never moves the old ones
               (see `assign_splits`). Empty files are skipped and their count logged as a
               warning. Any bytes are fine (no UTF-8 check).
  pg19         TFDS `pg19` ("book_text" of each book), splits train/validation/test.
  lm1b         TFDS `lm1b` ("text" of each sentence, one document per sentence); lm1b has no
               validation split, so `LM1B_VALIDATION_SENTENCES` sentences at fixed pseudo-random
               indices (seed 0) of train are the validation split and are left out of train.
  The TFDS datasets must be prepared as array_record beforehand (no download here):
  `tfds build pg19 --data_dir=DATA_DIR --file_format=array_record`.

Each split is written once as a flat uint16 .npy file [num_tokens] under
`<data_dir>/lm_streams/<task>-<digest>/` (the digest covers the inputs: file list with sizes and
mtimes, or the TFDS name and version) and opened with `np.load(mmap_mode="r")`. Files are written
in chunks to a temporary name and renamed; "info.json" (token, document and skip counts) is
renamed last and marks the folder complete. `StreamWriter` and `cached_streams` are shared with
`ssm.data.fasta`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ssm.config import ConfigError
from ssm.data.prepared import (SPLITS, Prepared, TaskSpec, TokenStream, setting_float,
                               setting_path)

log = logging.getLogger(__name__)

PAD_ID = 0
BOUNDARY_ID = 1
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET
UNIT = "byte"
CACHE_FOLDER = "lm_streams"
LM1B_VALIDATION_SENTENCES = 10_000
TFDS_TEXT_FEATURES = {"pg19": "book_text", "lm1b": "text"}
_READ_CHUNK = 1 << 24  # bytes read from a file at a time
_HEADER_SIZE = 128  # fixed .npy header, so the shape can be filled in when the stream is done


def encode_bytes(data: bytes) -> np.ndarray:
  """Token ids uint16 [len(data)] of raw bytes (byte b -> b + 2)."""
  return np.frombuffer(data, dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET


# ------------------------------------------------------------------------------ stream cache


def _npy_header(dtype: np.dtype, num_tokens: int) -> bytes:
  """A version-1.0 .npy header of exactly _HEADER_SIZE bytes for a 1-D array."""
  text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
               "shape": (int(num_tokens),)}).encode("latin1")
  size = _HEADER_SIZE - 10  # magic (6), version (2), header length (2)
  return (b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + text
          + b" " * (size - len(text) - 1) + b"\n")


class StreamWriter:
  """Writes one split's stream to `path` (.npy, 1-D `dtype`) in chunks: documents are joined
  by `boundary`; call `begin_document()` before each, `write(tokens)` any number of times, then
  `commit()` (renames the temporary file to `path`) or `abort()`."""

  def __init__(self, path: str | os.PathLike, dtype: Any, boundary: int):
    self.path = os.fspath(path)
    self.dtype = np.dtype(dtype)
    self.boundary = boundary
    self.num_tokens = 0
    self.num_documents = 0
    self._in_document = False
    self._tmp = f"{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    self._file = open(self._tmp, "wb")  # pylint: disable=consider-using-with
    self._file.write(_npy_header(self.dtype, 0))

  def begin_document(self) -> None:
    self._in_document = False

  def write(self, tokens: np.ndarray) -> None:
    if tokens.size == 0:
      return
    if not self._in_document:  # the boundary goes in only once the new document has tokens
      if self.num_documents:
        self._file.write(np.asarray([self.boundary], dtype=self.dtype).tobytes())
        self.num_tokens += 1
      self.num_documents += 1
      self._in_document = True
    self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
    self.num_tokens += int(tokens.size)

  def commit(self) -> None:
    self._file.seek(0)
    self._file.write(_npy_header(self.dtype, self.num_tokens))
    self._file.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._file.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def cached_streams(cache_dir: str, *, dtype: Any, boundary: int,
                   build: Callable[[Mapping[str, StreamWriter]], Mapping[str, Any]]
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The split streams under `cache_dir`, written first by `build(writers)` when the folder is
  not complete (no info.json). `build` fills one StreamWriter per split and returns extra
  counts for info.json. Returns ({split: memmap [num_tokens]}, info); info has "num_tokens" and
  "num_documents" per split besides what `build` returned. A split left empty is a ValueError."""
  info_path = os.path.join(cache_dir, "info.json")
  paths = {s: os.path.join(cache_dir, f"{s}.npy") for s in SPLITS}
  if not (os.path.exists(info_path) and all(map(os.path.exists, paths.values()))):
    os.makedirs(cache_dir, exist_ok=True)
    writers = {s: StreamWriter(paths[s], dtype, boundary) for s in SPLITS}
    try:
      info = dict(build(writers))
      empty = [s for s, w in writers.items() if w.num_tokens == 0]
      if empty:
        raise ValueError(f"the {', '.join(empty)} split(s) would be empty ({cache_dir})")
      for w in writers.values():
        w.commit()
    except BaseException:
      for w in writers.values():
        w.abort()
      raise
    info["num_tokens"] = {s: w.num_tokens for s, w in writers.items()}
    info["num_documents"] = {s: w.num_documents for s, w in writers.items()}
    _write_json(info_path, info)
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  return {s: np.load(p, mmap_mode="r") for s, p in paths.items()}, info


def cache_root(data_dir: str | None) -> str:
  """`<data_dir>/lm_streams` (data_dir None: the TFDS default data directory)."""
  if data_dir is None:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    data_dir = tfds.core.constants.DATA_DIR
  return os.path.join(os.path.expanduser(os.fspath(data_dir)), CACHE_FOLDER)


def digest(*parts: Any) -> str:
  """16 hex digits of sha1 over the JSON of `parts`."""
  return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ splits


def unit_hash(key: str) -> float:
  """sha1(key) as a number in [0, 1)."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_splits(keys: Sequence[str], val_fraction: float, test_fraction: float, *,
                  what: str) -> np.ndarray:
  """Split index per key (0 train, 1 validation, 2 test; int8 [len(keys)]) by `unit_hash`:
  test below test_fraction, validation below test_fraction + val_fraction, train above; so a
  new key never moves an old one. When a split would be empty the keys nearest to it in hash
  order are moved into it (one each for validation and test at least), which needs >= 3 keys;
  fewer is a ConfigError naming data.path (`what` says what was counted, e.g. "files")."""
  n = len(keys)
  if n < 3:
    raise ConfigError("data.path", f"found {n} {what}; need at least 3 (one each for train, "
                                   f"validation and test)")
  h = np.asarray([unit_hash(k) for k in keys])
  order = np.argsort(h, kind="stable")
  k_test = max(1, int(np.count_nonzero(h < test_fraction)))
  k_end = max(k_test + 1, int(np.count_nonzero(h < test_fraction + val_fraction)))
  k_end = min(k_end, n - 1)
  k_test = min(k_test, k_end - 1)
  split = np.zeros(n, dtype=np.int8)
  split[order[k_test:k_end]] = 1
  split[order[:k_test]] = 2
  return split


def split_fractions(settings: Mapping[str, Any]) -> tuple[float, float]:
  """(val_fraction, test_fraction) of the settings, each in [0, 1) and summing below 1."""
  val = setting_float(settings, "val_fraction", 0.0, 1.0)
  test = setting_float(settings, "test_fraction", 0.0, 1.0)
  if val + test >= 1:
    raise ConfigError("data.test_fraction", f"data.val_fraction + data.test_fraction must be "
                                            f"below 1, got {val} + {test}")
  return val, test


def _token_streams(streams: Mapping[str, np.ndarray]) -> dict[str, TokenStream]:
  return {s: TokenStream(tokens=t, boundary=BOUNDARY_ID) for s, t in streams.items()}


# ------------------------------------------------------------------------------ text folder


def list_text_files(root: str | os.PathLike, glob: str = "**/*.txt",
                    exclude: str | os.PathLike | None = None
                    ) -> tuple[list[tuple[str, int, int]], int]:
  """([(relative posix path, size, mtime_ns)] of the non-empty regular files under `root`
  matching `glob`, sorted by path], number of empty files skipped); files under the folder
  `exclude` (the stream cache, when data_dir lies inside the corpus) are left out."""
  root = pathlib.Path(root)
  skip = pathlib.Path(exclude).resolve() if exclude is not None else None
  try:
    paths = [p for p in root.glob(glob)
             if p.is_file() and (skip is None or skip not in p.resolve().parents)]
  except (ValueError, NotImplementedError) as e:
    raise ConfigError("data.glob", f"{glob!r} is not a relative glob pattern: {e}") from None
  files, empty = [], 0
  for p in paths:
    st = p.stat()
    if st.st_size == 0:
      empty += 1
    else:
      files.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
  return sorted(files), empty


def text_folder_streams(path: str, *, glob: str = "**/*.txt", val_fraction: float = 0.05,
                        test_fraction: float = 0.05, data_dir: str | None
                        ) -> tuple[dict[str, TokenStream], dict[str, Any]]:
  """The three split streams of a folder of text files (see the module doc) and the info of the
  cache ("files" per split, "empty_files", "num_tokens", "num_documents")."""
  root = pathlib.Path(path).expanduser().resolve()
  if not root.is_dir():
    raise ConfigError("data.path", f"{path!r} is not a folder")
  cache = cache_root(data_dir)
  files, empty = list_text_files(root, glob, exclude=cache)
  if empty:
    log.warning("text_folder: skipped %d empty file(s) under %s", empty, root)
  if len(files) < 3:
    total = sum(1 for p in root.rglob("*") if p.is_file())
    raise ConfigError("data.path", f"found {len(files)} non-empty files matching "
                                   f"data.glob={glob!r} under {root} ({empty} empty, {total} "
                                   f"files in all); need at least 3 (train, validation, test)")
  split = assign_splits([f[0] for f in files], val_fraction, test_fraction,
                        what=f"non-empty files matching data.glob={glob!r} under {root}")

  def build(writers):
    for (rel, _, _), s in zip(files, split):
      writer = writers[SPLITS[s]]
      writer.begin_document()
      with open(root / rel, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
          writer.write(encode_bytes(chunk))
    return {"root": str(root), "empty_files": empty,
            "files": {name: [f[0] for f, s in zip(files, split) if s == i]
                      for i, name in enumerate(SPLITS)}}

  key = digest("text_folder/1", str(root), glob, val_fraction, test_fraction, files)
  streams, info = cached_streams(os.path.join(cache, f"text_folder-{key}"),
                                 dtype=np.uint16, boundary=BOUNDARY_ID, build=build)
  return _token_streams(streams), info


# ------------------------------------------------------------------------------ TFDS corpora


def _as_bytes(text: Any) -> bytes:
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def tfds_streams(name: str, *, data_dir: str | None
                 ) -> tuple[dict[str, TokenStream], dict[str, Any]]:
  """The three split streams of TFDS `pg19` or `lm1b` (see the module doc) and the cache info.
  The dataset must already be prepared as array_record in data_dir (else a ConfigError naming
  data.data_dir and the `tfds build` command)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  feature = TFDS_TEXT_FEATURES[name]
  builder = tfds.builder(name, data_dir=data_dir)
  splits = ("train", "test") if name == "lm1b" else SPLITS
  try:
    sources = {s: builder.as_data_source(s) for s in splits}
  except (NotImplementedError, FileNotFoundError, AssertionError, ValueError) as e:
    raise ConfigError("data.data_dir", f"TFDS {name} {builder.info.version} is not prepared "
                      f"as array_record in {builder.data_dir}; prepare it with `tfds build "
                      f"{name} --data_dir={data_dir or '~/tensorflow_datasets'} "
                      f"--file_format=array_record`") from e
  indices = {s: range(len(src)) for s, src in sources.items()}
  if name == "lm1b":
    n = len(sources["train"])
    if n < 2:
      raise ValueError(f"lm1b train has {n} sentences; need 2 or more to carve out validation")
    k = min(LM1B_VALIDATION_SENTENCES, max(1, n // 10))
    held = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False)).tolist()
    sources["validation"] = sources["train"]
    indices["validation"] = held
    held_set = set(held)
    indices["train"] = (i for i in range(n) if i not in held_set)

  def build(writers):
    for s in SPLITS:
      src, writer = sources[s], writers[s]
      for i in indices[s]:
        writer.begin_document()
        writer.write(encode_bytes(_as_bytes(src[int(i)][feature])))
    return {"dataset": name, "version": str(builder.info.version)}

  key = digest(f"tfds/{name}/1", str(builder.info.version), LM1B_VALIDATION_SENTENCES,
               {s: len(v) for s, v in sources.items()})
  cache = os.path.join(cache_root(data_dir), f"{name}-{builder.info.version}-{key}")
  streams, info = cached_streams(cache, dtype=np.uint16, boundary=BOUNDARY_ID, build=build)
  return _token_streams(streams), info


# ------------------------------------------------------------------------------ tasks


def _prepared(streams: Mapping[str, TokenStream]) -> Prepared:
  return Prepared(kind="lm", vocab_size=VOCAB_SIZE, num_classes=0, sources=dict(streams),
                  unit=UNIT)


def load_text_folder(settings: Mapping[str, Any], *, data_dir: str | None,
                     manual_dir: str | None = None) -> Prepared:
  del manual_dir  # unused
  path = setting_path(settings, "path", required=True)
  glob = settings["glob"]
  if not isinstance(glob, str) or not glob:
    raise ConfigError("data.glob", f"must be a non-empty glob pattern, got {glob!r}")
  val, test = split_fractions(settings)
  streams, _ = text_folder_streams(path, glob=glob, val_fraction=val, test_fraction=test,
                                   data_dir=data_dir)
  return _prepared(streams)


def _tfds_loader(name: str) -> Callable[..., Prepared]:
  def load(settings: Mapping[str, Any], *, data_dir: str | None,
           manual_dir: str | None = None) -> Prepared:
    del settings, manual_dir  # no settings of its own
    return _prepared(tfds_streams(name, data_dir=data_dir)[0])
  return load


TASK_SPECS = {
    "text_folder": TaskSpec(
        "lm", {"path": None, "glob": "**/*.txt", "val_fraction": 0.05, "test_fraction": 0.05},
        load_text_folder, "byte-level LM on the files of a local folder (split by file)"),
    "pg19": TaskSpec("lm", {}, _tfds_loader("pg19"),
                     "byte-level LM on TFDS pg19 books (prepared as array_record)"),
    "lm1b": TaskSpec("lm", {}, _tfds_loader("lm1b"),
                     "byte-level LM on TFDS lm1b sentences (prepared as array_record)"),
}
