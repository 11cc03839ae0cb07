"""DNA language modelling on FASTA files: task "fasta_dna" (kind "lm", unit "base").

Tokens: 0 padding (never in a stream), 1 record boundary (between two records), A C G T N ->
2 3 4 5 6 (either case); every other letter (the IUPAC ambiguity codes R Y S W K M B D H V, U,
...) is read as N, and how many of each were is logged as a warning. VOCAB_SIZE = 7.

Input (`data.path`): one FASTA file (any name; gzip when it ends in ".gz") or a folder searched
recursively for *.fa, *.fasta, *.fna (optionally .gz; any case), read in the order of their
paths. A record is a '>' header line (its id: the first word after '>') and the sequence lines
up to the next header; blank lines are skipped and trailing whitespace is stripped. Records
without bases are skipped and counted. Errors name the file and the 1-based line: a sequence
line before any header, or a character other than a letter (the character and its column).

Records are split into train/validation/test by a hash of their id (`lm_bytes.assign_splits`:
deterministic, and adding records never moves the old ones). Each split is one uint8 stream
[num_tokens], written once under `<data_dir>/lm_streams/fasta_dna-<digest>/` (digest of the file
paths, sizes and mtimes and the fractions) by `lm_bytes.cached_streams` and memory-mapped.
"""

from __future__ import annotations

import collections
import gzip
import logging
import os
import pathlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ssm.config import ConfigError
from ssm.data.lm_bytes import assign_splits, cache_root, cached_streams, digest, split_fractions
from ssm.data.prepared import SPLITS, Prepared, TaskSpec, TokenStream, setting_path

log = logging.getLogger(__name__)

PAD_ID = 0
BOUNDARY_ID = 1
BASES = "ACGTN"
VOCAB_SIZE = 2 + len(BASES)
UNIT = "base"
SUFFIXES = (".fa", ".fasta", ".fna")
_FLUSH_BYTES = 1 << 20  # sequence bytes gathered before they are encoded

# byte -> token: 0 for a non-letter (an error), N for letters other than A C G T N.
_LUT = np.zeros(256, dtype=np.uint8)
_LUT[[*range(ord("A"), ord("Z") + 1), *range(ord("a"), ord("z") + 1)]] = 2 + BASES.index("N")
for _i, _base in enumerate(BASES):
  _LUT[[ord(_base), ord(_base.lower())]] = 2 + _i
_OTHER = (_LUT == 2 + BASES.index("N"))
_OTHER[[ord("N"), ord("n")]] = False


def _open(path: pathlib.Path):
  return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _record_id(header: bytes) -> str:
  words = header[1:].split(maxsplit=1)
  return words[0].decode("utf-8", "replace") if words else ""


def find_fasta_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """[path] for a file; for a folder its *.fa/*.fasta/*.fna[.gz] files, sorted by relative
  path. ConfigError naming data.path when there is none."""
  root = pathlib.Path(path).expanduser().resolve()
  if root.is_file():
    return [root]
  if not root.is_dir():
    raise ConfigError("data.path", f"{os.fspath(path)!r} is neither a file nor a folder")
  files = sorted((p for p in root.rglob("*") if p.is_file()
                  and p.name.lower().removesuffix(".gz").endswith(SUFFIXES)),
                 key=lambda p: p.relative_to(root).as_posix())
  if not files:
    raise ConfigError("data.path", f"no FASTA files ({', '.join(SUFFIXES)}, optionally .gz) "
                                   f"under {root}")
  return files


def scan_records(path: pathlib.Path) -> list[tuple[str, bool]]:
  """[(record id, whether it has any bases)] of a FASTA file, in file order. ValueError naming
  the file and line for a sequence line before any header, or the file when it is unreadable."""
  records: list[tuple[str, bool]] = []
  try:
    with _open(path) as f:
      for lineno, line in enumerate(f, start=1):
        if line.startswith(b">"):
          records.append((_record_id(line), False))
        elif (not records or not records[-1][1]) and line.strip():
          if not records:
            raise ValueError(f"{path}:{lineno}: sequence line before any '>' header")
          records[-1] = (records[-1][0], True)
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: not a readable gzip file: {e}") from None
  return records


def read_fasta(path: pathlib.Path, other_letters: collections.Counter | None = None
               ) -> Iterator[str | np.ndarray]:
  """Yields, in file order, the id (str) of each record at its header, then its bases as uint8
  token arrays (any number, each non-empty). Letters other than A/C/G/T/N become N and are
  counted by their upper-case letter in `other_letters`. ValueError naming the file, line and
  character for anything but a letter in a sequence line."""
  lines: list[bytes] = []
  linenos: list[int] = []
  size = 0

  def flush() -> np.ndarray:
    raw = np.frombuffer(b"".join(lines), dtype=np.uint8)
    tokens = _LUT[raw]
    if not tokens.all():
      for line, lineno in zip(lines, linenos):
        bad = np.flatnonzero(_LUT[np.frombuffer(line, dtype=np.uint8)] == 0)
        if bad.size:
          char = chr(line[bad[0]])
          raise ValueError(f"{path}:{lineno}: character {char!r} (column {bad[0] + 1}) is "
                           f"not a letter")
    other = raw[_OTHER[raw]]
    if other.size and other_letters is not None:
      for byte, n in enumerate(np.bincount(other & 0xDF, minlength=256)):
        if n:
          other_letters[chr(byte)] += int(n)
    lines.clear()
    linenos.clear()
    return tokens

  with _open(path) as f:
    for lineno, line in enumerate(f, start=1):
      if line.startswith(b">"):
        if lines:
          yield flush()
          size = 0
        yield _record_id(line)
        continue
      line = line.rstrip()
      if not line:
        continue
      lines.append(line)
      linenos.append(lineno)
      size += len(line)
      if size >= _FLUSH_BYTES:
        yield flush()
        size = 0
    if lines:
      yield flush()


def fasta_streams(path: str, *, val_fraction: float = 0.05, test_fraction: float = 0.05,
                  data_dir: str | None) -> tuple[dict[str, TokenStream], dict[str, Any]]:
  """The three split streams of the FASTA file(s) at `path` and the info of the cache:
  "records" per split, "empty_records", "other_letters" ({letter: count} read as N), plus
  "num_tokens" and "num_documents" per split. Logs the skipped and replaced counts."""
  files = find_fasta_files(path)

  def build(writers):
    records = [r for p in files for r in scan_records(p)]
    full = [i for i, (_, has_bases) in enumerate(records) if has_bases]
    split = np.full(len(records), -1, dtype=np.int8)
    split[full] = assign_splits([records[i][0] for i in full], val_fraction, test_fraction,
                                what=f"FASTA records with bases in {path}")
    other: collections.Counter = collections.Counter()
    index, writer = -1, None
    for p in files:
      for item in read_fasta(p, other):
        if isinstance(item, str):
          index += 1
          writer = writers[SPLITS[split[index]]] if split[index] >= 0 else None
          if writer is not None:
            writer.begin_document()
        elif writer is not None:
          writer.write(item)
    return {"files": [str(p) for p in files], "empty_records": len(records) - len(full),
            "records": {s: int(np.count_nonzero(split == i)) for i, s in enumerate(SPLITS)},
            "other_letters": dict(sorted(other.items()))}

  stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
  key = digest("fasta_dna/1", stats, val_fraction, test_fraction)
  streams, info = cached_streams(os.path.join(cache_root(data_dir), f"fasta_dna-{key}"),
                                 dtype=np.uint8, boundary=BOUNDARY_ID, build=build)
  if info["empty_records"]:
    log.warning("fasta_dna: skipped %d record(s) without bases in %s", info["empty_records"],
                path)
  if info["other_letters"]:
    log.warning("fasta_dna: read %d letter(s) other than A/C/G/T/N as N in %s (%s)",
                sum(info["other_letters"].values()), path,
                ", ".join(f"{k}: {v}" for k, v in info["other_letters"].items()))
  return {s: TokenStream(tokens=t, boundary=BOUNDARY_ID) for s, t in streams.items()}, info


def load_fasta_dna(settings: Mapping[str, Any], *, data_dir: str | None,
                   manual_dir: str | None = None) -> Prepared:
  del manual_dir  # unused
  path = setting_path(settings, "path", required=True)
  val, test = split_fractions(settings)
  streams, _ = fasta_streams(path, val_fraction=val, test_fraction=test, data_dir=data_dir)
  return Prepared(kind="lm", vocab_size=VOCAB_SIZE, num_classes=0, sources=streams, unit=UNIT)


TASK_SPECS = {
    "fasta_dna": TaskSpec("lm", {"path": None, "val_fraction": 0.05, "test_fraction": 0.05},
                          load_fasta_dna, "DNA LM on FASTA records (A/C/G/T/N, split by record)"),
}
