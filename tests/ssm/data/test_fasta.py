"""FASTA DNA streams: known records -> known tokens, the split by record id (an independent
sha1 reference), other letters read as N and counted, errors naming file:line, gzip, folders."""

from __future__ import annotations

import gzip
import hashlib
import logging

import numpy as np
import pytest

from ssm.config import ConfigError
from ssm.data import fasta
from ssm.data.prepared import SPLITS, Prepared

TOKEN = {"A": 2, "C": 3, "G": 4, "T": 5, "N": 6}
# With fractions 0.2 / 0.2 these ids split by threshold alone (test: chr4, chr11; validation:
# chr2, chr9, chr6, chr5), so no split needs filling in.
IDS = [f"chr{i}" for i in range(1, 13)]


def reference_split(record_id: str, val: float = 0.2, test: float = 0.2) -> str:
  h = int.from_bytes(hashlib.sha1(record_id.encode()).digest()[:8], "big") / 2**64
  return "test" if h < test else "validation" if h < test + val else "train"


def bases_of(i: int) -> str:
  return "".join("ACGT"[(i * 7 + j * j) % 4] for j in range(5 + 3 * i))


def fasta_text(ids=IDS, width=4) -> str:
  lines = []
  for i, rid in enumerate(ids):
    seq = bases_of(i)
    seq = seq[:2].lower() + seq[2:]  # lower case is the same base
    lines.append(f">{rid} some description")
    lines += [seq[k:k + width] for k in range(0, len(seq), width)]
  return "\n".join(lines) + "\n"


def expected_stream(seqs: list[str]) -> np.ndarray:
  out = []
  for i, seq in enumerate(seqs):
    if i:
      out.append(1)
    out += [TOKEN[c] for c in seq.upper()]
  return np.asarray(out, dtype=np.int64)


def streams_of(path, data_dir, **kw):
  kw = {"val_fraction": 0.2, "test_fraction": 0.2, **kw}
  return fasta.fasta_streams(str(path), data_dir=str(data_dir), **kw)


def test_known_records_give_known_tokens_by_split(tmp_path):
  path = tmp_path / "genome.fa"
  path.write_text(fasta_text())
  streams, info = streams_of(path, tmp_path / "data")
  expected = {s: [i for i, rid in enumerate(IDS) if reference_split(rid) == s] for s in SPLITS}
  assert [IDS[i] for i in expected["test"]] == ["chr4", "chr11"]
  assert len(expected["validation"]) == 4
  assert info["records"] == {s: len(v) for s, v in expected.items()}
  for split in SPLITS:
    tokens = streams[split].tokens
    assert tokens.dtype == np.uint8 and streams[split].boundary == 1
    np.testing.assert_array_equal(tokens, expected_stream([bases_of(i) for i in expected[split]]))
    assert tokens.min() >= 1 and tokens.max() < fasta.VOCAB_SIZE
  assert info["empty_records"] == 0 and info["other_letters"] == {}


def test_read_fasta_yields_ids_and_tokens(tmp_path):
  path = tmp_path / "x.fasta"
  path.write_bytes(b"\n>seq1 desc\nACgt\r\nNn  \n\n>seq2\nTTA\n>\nG\n")
  items = list(fasta.read_fasta(path))
  assert [i for i in items if isinstance(i, str)] == ["seq1", "seq2", ""]
  arrays = [i.tolist() for i in items if not isinstance(i, str)]
  assert arrays == [[2, 3, 4, 5, 6, 6], [5, 5, 2], [4]]
  assert fasta.VOCAB_SIZE == 7 and fasta.BOUNDARY_ID == 1 and fasta.PAD_ID == 0


def test_other_letters_become_n_and_are_counted(tmp_path, caplog):
  path = tmp_path / "iupac.fa"
  path.write_text(">a\nACRYGT\n>b\nkkmN\n>c\nACGU\n>d\nTTTT\n")
  with caplog.at_level(logging.WARNING, logger="ssm.data.fasta"):
    streams, info = streams_of(path, tmp_path / "data")
  assert info["other_letters"] == {"K": 2, "M": 1, "R": 1, "U": 1, "Y": 1}
  assert "read 6 letter(s) other than A/C/G/T/N as N" in caplog.text
  every = np.concatenate([np.asarray(streams[s].tokens) for s in SPLITS])
  assert np.count_nonzero(every == TOKEN["N"]) == 7  # 6 replaced + one real N
  tokens = [i.tolist() for i in fasta.read_fasta(path) if not isinstance(i, str)]
  assert tokens == [[2, 3, 6, 6, 4, 5], [6, 6, 6, 6], [2, 3, 4, 6], [5, 5, 5, 5]]


def test_errors_name_file_line_and_character(tmp_path):
  before = tmp_path / "before.fa"
  before.write_text("\nACGT\n>r1\nACGT\n")
  with pytest.raises(ValueError, match=rf"{before}:2: sequence line before any '>' header"):
    streams_of(before, tmp_path / "data")
  bad = tmp_path / "bad.fa"
  bad.write_text(">r1\nACGT\n>r2\nAC\nAC-T\n>r3\nA\n")
  with pytest.raises(ValueError, match=rf"{bad}:5: character '-' \(column 3\) is not a letter"):
    streams_of(bad, tmp_path / "data")
  inner = tmp_path / "inner.fa.gz"
  with gzip.open(inner, "wt") as f:
    f.write(">r1\nACGT\n>r2\nAC GT\n>r3\nA\n")
  with pytest.raises(ValueError, match=rf"{inner}:4: character ' ' \(column 3\)"):
    streams_of(inner, tmp_path / "data")
  # Nothing half-written is left behind.
  assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
  fake = tmp_path / "fake.fa.gz"
  fake.write_text(">r1\nACGT\n")
  with pytest.raises(ValueError, match=rf"{fake}: not a readable gzip file"):
    streams_of(fake, tmp_path / "data")


def test_errors_inside_a_large_batch_find_their_line(tmp_path, monkeypatch):
  monkeypatch.setattr(fasta, "_FLUSH_BYTES", 1 << 30)
  path = tmp_path / "long.fa"
  path.write_text(">r1\n" + "ACGT\n" * 50 + "ACGTX\nAC*T\n")
  with pytest.raises(ValueError, match=r"long\.fa:53: character '\*' \(column 3\)"):
    list(fasta.read_fasta(path))


def test_gzip_and_small_flushes_give_the_same_stream(tmp_path, monkeypatch):
  plain = tmp_path / "g.fna"
  plain.write_text(fasta_text())
  packed = tmp_path / "g.fna.gz"
  with gzip.open(packed, "wt") as f:
    f.write(fasta_text(width=7))
  a, _ = streams_of(plain, tmp_path / "d1")
  monkeypatch.setattr(fasta, "_FLUSH_BYTES", 3)
  b, _ = streams_of(packed, tmp_path / "d2")
  pieces = [i for i in fasta.read_fasta(packed) if not isinstance(i, str)]
  assert len(pieces) > 2 * len(IDS) and max(p.size for p in pieces) <= 7  # flushed every line
  for s in SPLITS:
    np.testing.assert_array_equal(a[s].tokens, b[s].tokens)


def test_folder_of_files_in_path_order_and_empty_records(tmp_path, caplog):
  root = tmp_path / "genomes"
  (root / "b").mkdir(parents=True)
  (root / "a.fa").write_text(fasta_text(IDS[:5]) + ">empty1\n\n")
  with gzip.open(root / "b" / "c.FASTA.gz", "wt") as f:
    f.write(">empty2\n" + fasta_text(IDS[5:]))
  (root / "notes.txt").write_text("not FASTA: ignored\n")
  assert [p.name for p in fasta.find_fasta_files(root)] == ["a.fa", "c.FASTA.gz"]
  with caplog.at_level(logging.WARNING, logger="ssm.data.fasta"):
    streams, info = streams_of(root, tmp_path / "data")
  assert info["empty_records"] == 2
  assert "skipped 2 record(s) without bases" in caplog.text
  # The same records in one file, in the same order, give the same streams.
  (tmp_path / "one.fa").write_text(fasta_text(IDS[:5]) + fasta_text(IDS[5:]))
  one, _ = streams_of(tmp_path / "one.fa", tmp_path / "data")
  # bases_of(i) restarts at i = 0 in the second file.
  expected = {s: [bases_of(i) for i, r in enumerate(IDS[:5]) if reference_split(r) == s]
              + [bases_of(i) for i, r in enumerate(IDS[5:]) if reference_split(r) == s]
              for s in SPLITS}
  for s in SPLITS:
    np.testing.assert_array_equal(streams[s].tokens, expected_stream(expected[s]))
    np.testing.assert_array_equal(one[s].tokens, streams[s].tokens)


def test_load_fasta_dna_and_the_stream_cache(tmp_path):
  path = tmp_path / "genome.fa"
  path.write_text(fasta_text())
  spec = fasta.TASK_SPECS["fasta_dna"]
  settings = {"path": str(path), "val_fraction": 0.2, "test_fraction": 0.2}
  assert set(spec.fields) == set(settings) and spec.kind == "lm"
  prepared = spec.load(settings, data_dir=str(tmp_path / "data"), manual_dir=None)
  assert isinstance(prepared, Prepared)
  assert (prepared.kind, prepared.vocab_size, prepared.unit) == ("lm", 7, "base")
  (cache,) = (tmp_path / "data" / "lm_streams").iterdir()
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  again = spec.load(settings, data_dir=str(tmp_path / "data"))
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
  for s in SPLITS:
    np.testing.assert_array_equal(again.sources[s].tokens, prepared.sources[s].tokens)
  with pytest.raises(ConfigError, match=r"data\.path.*found 2 FASTA records"):
    few = tmp_path / "few.fa"
    few.write_text(">a\nAC\n>b\nGT\n>c\n")
    spec.load({**settings, "path": str(few)}, data_dir=str(tmp_path / "data"))
  with pytest.raises(ConfigError, match=r"data\.path.*no FASTA files"):
    (tmp_path / "empty_dir").mkdir()
    spec.load({**settings, "path": str(tmp_path / "empty_dir")}, data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"data\.path.*neither a file nor a folder"):
    spec.load({**settings, "path": str(tmp_path / "missing.fa")}, data_dir=str(tmp_path))
