"""Byte-level LM streams: token mapping, the split by file (an independent sha1 reference),
boundaries, the stream cache, empty files, and pg19/lm1b through `tfds.testing.mock_data`."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data import lm_bytes
from ssm.data.prepared import SPLITS, Prepared, TokenStream

tfds.disable_progress_bar()

# With fractions 0.2 / 0.2 these names split by threshold alone (test: doc06, doc16, doc19;
# validation: doc02, doc18), so no split needs filling in.
NAMES = [f"doc{i:02d}.txt" for i in range(20)]
SETTINGS = {"path": None, "glob": "**/*.txt", "val_fraction": 0.2, "test_fraction": 0.2}


def reference_split(rel: str, val: float, test: float) -> str:
  h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big") / 2**64
  return "test" if h < test else "validation" if h < test + val else "train"


def text_of(rel: str) -> bytes:
  return f"{rel}: caf\u00e9 \u00fcber\n".encode() + bytes(range(0, 256, 37))


def write_folder(root: pathlib.Path, names=NAMES) -> pathlib.Path:
  for rel in names:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(text_of(rel))
  return root


def expected_stream(docs: list[bytes]) -> np.ndarray:
  parts = []
  for i, doc in enumerate(docs):
    if i:
      parts.append([1])
    parts.append([b + 2 for b in doc])
  return np.concatenate(parts).astype(np.int64)


def folder_streams(root, data_dir, **kw):
  kw = {"val_fraction": 0.2, "test_fraction": 0.2, **kw}
  return lm_bytes.text_folder_streams(str(root), data_dir=str(data_dir), **kw)


def test_encode_known_bytes():
  np.testing.assert_array_equal(lm_bytes.encode_bytes(b"Hi\n"), [72 + 2, 105 + 2, 10 + 2])
  every = lm_bytes.encode_bytes(bytes(range(256)))
  assert every.dtype == np.uint16
  np.testing.assert_array_equal(every, np.arange(2, 258))
  assert lm_bytes.VOCAB_SIZE == 258 and lm_bytes.BOUNDARY_ID == 1 and lm_bytes.PAD_ID == 0


def test_text_folder_streams_follow_the_hash_split(tmp_path):
  root = write_folder(tmp_path / "corpus")
  (tmp_path / "corpus" / "notes.md").write_bytes(b"not matched by the default glob")
  streams, info = folder_streams(root, tmp_path / "data")
  expected = {s: [n for n in NAMES if reference_split(n, 0.2, 0.2) == s] for s in SPLITS}
  assert expected["test"] == ["doc06.txt", "doc16.txt", "doc19.txt"]
  assert expected["validation"] == ["doc02.txt", "doc18.txt"]
  assert info["files"] == expected
  for split in SPLITS:
    stream = streams[split]
    assert isinstance(stream, TokenStream) and stream.boundary == 1
    assert isinstance(stream.tokens, np.memmap) and stream.tokens.dtype == np.uint16
    np.testing.assert_array_equal(stream.tokens,
                                  expected_stream([text_of(n) for n in expected[split]]))
    assert stream.tokens.min() >= 1 and stream.tokens.max() < lm_bytes.VOCAB_SIZE
    assert info["num_documents"][split] == len(expected[split])
    assert info["num_tokens"][split] == len(stream)


def test_load_text_folder_gives_a_prepared_lm(tmp_path):
  root = write_folder(tmp_path / "corpus", ["a/x.txt", "b/y.txt", "c.txt", "d/e/f.txt"])
  prepared = lm_bytes.TASK_SPECS["text_folder"].load(
      {**SETTINGS, "path": str(root)}, data_dir=str(tmp_path / "data"), manual_dir=None)
  assert isinstance(prepared, Prepared)
  assert (prepared.kind, prepared.vocab_size, prepared.num_classes, prepared.unit) == (
      "lm", 258, 0, "byte")
  docs = sorted(int(prepared.sources[s].tokens.size) > 0 for s in SPLITS)
  assert docs == [True, True, True]
  total = sum(int(np.count_nonzero(prepared.sources[s].tokens == 1)) for s in SPLITS)
  assert total == 4 - 3  # four documents in three splits: one boundary
  assert lm_bytes.TASK_SPECS["text_folder"].kind == "lm"
  assert set(lm_bytes.TASK_SPECS["text_folder"].fields) == set(SETTINGS)


def test_split_is_deterministic_and_stable_when_files_are_added(tmp_path):
  root = write_folder(tmp_path / "corpus")
  _, first = folder_streams(root, tmp_path / "d1")
  _, again = folder_streams(root, tmp_path / "d2")
  assert first["files"] == again["files"]
  write_folder(root, ["new_one.txt", "sub/new_two.txt", "zz.txt"])
  _, grown = folder_streams(root, tmp_path / "d1")
  for split in SPLITS:
    assert set(first["files"][split]) <= set(grown["files"][split])
  assert sum(len(v) for v in grown["files"].values()) == len(NAMES) + 3
  # A new file list is a new cache folder; the old one stays.
  assert len(os.listdir(tmp_path / "d1" / "lm_streams")) == 2


def test_small_folders_still_get_one_file_per_split(tmp_path):
  root = write_folder(tmp_path / "corpus", ["a.txt", "b.txt", "c.txt"])
  streams, info = folder_streams(root, tmp_path / "data", val_fraction=0.0, test_fraction=0.0)
  assert sorted(len(v) for v in info["files"].values()) == [1, 1, 1]
  assert all(len(streams[s]) > 0 for s in SPLITS)
  # The file lowest in hash order is test, the next validation.
  order = sorted(["a.txt", "b.txt", "c.txt"],
                 key=lambda r: hashlib.sha1(r.encode()).digest()[:8])
  assert info["files"]["test"] == order[:1] and info["files"]["validation"] == order[1:2]
  (root / "c.txt").unlink()
  with pytest.raises(ConfigError, match=r"data\.path.*found 2 non-empty files"):
    folder_streams(root, tmp_path / "data")


def test_stream_cache_is_reused_and_follows_file_changes(tmp_path):
  root = write_folder(tmp_path / "corpus")
  data = tmp_path / "data"
  streams, _ = folder_streams(root, data)
  (cache,) = (data / "lm_streams").iterdir()
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  assert sorted(mtimes) == ["info.json", "test.npy", "train.npy", "validation.npy"]
  again, _ = folder_streams(root, data)
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
  for s in SPLITS:
    np.testing.assert_array_equal(again[s].tokens, streams[s].tokens)
  # An edited file (new size and mtime) is a new cache with the new text.
  (root / "doc16.txt").write_bytes(b"edited")
  edited, info = folder_streams(root, data)
  assert len(list((data / "lm_streams").iterdir())) == 2
  assert "doc16.txt" in info["files"]["test"]
  tokens = np.asarray(edited["test"].tokens)
  assert (tokens[tokens > 1] - 2).astype(np.uint8).tobytes().count(b"edited") == 1
  assert not [p for p in (data / "lm_streams").rglob("*") if ".tmp-" in p.name]


def test_a_cache_inside_the_corpus_is_not_read_as_text(tmp_path):
  root = write_folder(tmp_path / "corpus")
  first, info = folder_streams(root, root, glob="**/*")
  again, info2 = folder_streams(root, root, glob="**/*")
  assert info2 == info and len(list((root / "lm_streams").iterdir())) == 1
  assert sum(len(v) for v in info["files"].values()) == len(NAMES)


def test_chunked_reads_give_the_same_stream(tmp_path, monkeypatch):
  root = write_folder(tmp_path / "corpus")
  whole, _ = folder_streams(root, tmp_path / "d1")
  monkeypatch.setattr(lm_bytes, "_READ_CHUNK", 7)
  chunked, _ = folder_streams(root, tmp_path / "d2")
  for s in SPLITS:
    np.testing.assert_array_equal(chunked[s].tokens, whole[s].tokens)


def test_empty_files_are_skipped_and_counted(tmp_path, caplog):
  root = write_folder(tmp_path / "corpus")
  for rel in ("doc16.txt", "empty_a.txt", "deep/empty_b.txt"):  # doc16 (test) becomes empty
    (root / rel).parent.mkdir(exist_ok=True)
    (root / rel).write_bytes(b"")
  with caplog.at_level(logging.WARNING, logger="ssm.data.lm_bytes"):
    streams, info = folder_streams(root, tmp_path / "data")
  assert info["empty_files"] == 3
  assert "skipped 3 empty file(s)" in caplog.text
  assert info["files"]["test"] == ["doc06.txt", "doc19.txt"]
  np.testing.assert_array_equal(streams["test"].tokens,
                                expected_stream([text_of("doc06.txt"), text_of("doc19.txt")]))


def test_glob_and_setting_errors(tmp_path):
  root = write_folder(tmp_path / "corpus", ["a.md", "b.md", "c.md", "d.txt"])
  load = lm_bytes.TASK_SPECS["text_folder"].load
  data_dir = str(tmp_path / "data")
  with pytest.raises(ConfigError, match=r"data\.path.*found 1 non-empty files.*'\*\*/\*\.txt'"
                                        r".*4 files in all"):
    load({**SETTINGS, "path": str(root)}, data_dir=data_dir)
  prepared = load({**SETTINGS, "path": str(root), "glob": "*.md"}, data_dir=data_dir)
  assert sum(len(prepared.sources[s]) for s in SPLITS) == 3 * len(text_of("a.md"))  # a file a split
  with pytest.raises(ConfigError, match=r"data\.path.*not a folder"):
    load({**SETTINGS, "path": str(root / "a.md")}, data_dir=data_dir)
  with pytest.raises(ConfigError, match=r"data\.path"):
    load(SETTINGS, data_dir=data_dir)
  with pytest.raises(ConfigError, match=r"data\.test_fraction.*below 1"):
    load({**SETTINGS, "path": str(root), "val_fraction": 0.5, "test_fraction": 0.5},
         data_dir=data_dir)
  with pytest.raises(ConfigError, match=r"data\.val_fraction"):
    load({**SETTINGS, "path": str(root), "val_fraction": -0.1}, data_dir=data_dir)
  with pytest.raises(ConfigError, match=r"data\.glob"):
    load({**SETTINGS, "path": str(root), "glob": ""}, data_dir=data_dir)


# ------------------------------------------------------------------------------ TFDS corpora

BOOKS = {"train": ["Call me Ishmael.", "It was the best of times,", "caf\u00e9"],
         "validation": ["Happy families are all alike;"],
         "test": ["In the beginning", "Once upon a time"]}
SENTENCES = {"train": [f"Sentence number {i} ." for i in range(45)],
             "test": ["A test sentence .", "Another one ."]}


def fake_source(texts, feature):
  def as_data_source(self, split, **kwargs):
    del self, kwargs
    return [{feature: t} for t in texts[split]]
  return as_data_source


def test_pg19_streams_from_known_books(tmp_path):
  with tfds.testing.mock_data(as_data_source_fn=fake_source(BOOKS, "book_text")):
    prepared = lm_bytes.TASK_SPECS["pg19"].load({}, data_dir=str(tmp_path), manual_dir=None)
  assert (prepared.vocab_size, prepared.unit) == (258, "byte")
  for split in SPLITS:
    np.testing.assert_array_equal(prepared.sources[split].tokens,
                                  expected_stream([b.encode() for b in BOOKS[split]]))
  (cache,) = (tmp_path / "lm_streams").iterdir()
  assert cache.name.startswith("pg19-0.1.1-")


def test_lm1b_carves_validation_from_train(tmp_path):
  with tfds.testing.mock_data(as_data_source_fn=fake_source(SENTENCES, "text")):
    streams, info = lm_bytes.tfds_streams("lm1b", data_dir=str(tmp_path))
    again, _ = lm_bytes.tfds_streams("lm1b", data_dir=str(tmp_path))
  held = np.sort(np.random.default_rng(0).choice(45, size=4, replace=False))  # 45 // 10
  train = SENTENCES["train"]
  val = [train[i] for i in held]
  rest = [s for i, s in enumerate(train) if i not in set(held)]
  np.testing.assert_array_equal(streams["validation"].tokens,
                                expected_stream([s.encode() for s in val]))
  np.testing.assert_array_equal(streams["train"].tokens,
                                expected_stream([s.encode() for s in rest]))
  np.testing.assert_array_equal(streams["test"].tokens,
                                expected_stream([s.encode() for s in SENTENCES["test"]]))
  assert info["num_documents"] == {"train": 41, "validation": 4, "test": 2}
  for s in SPLITS:
    np.testing.assert_array_equal(again[s].tokens, streams[s].tokens)


def test_pg19_with_random_mock_examples(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    streams, info = lm_bytes.tfds_streams("pg19", data_dir=str(tmp_path))
  assert info["num_documents"] == {"train": 3, "validation": 3, "test": 3}
  for s in SPLITS:
    tokens = streams[s].tokens
    assert tokens.min() >= 1 and tokens.max() < 258
    assert np.count_nonzero(tokens == 1) == 2


def test_unprepared_tfds_dataset_names_the_build_command(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.data_dir.*tfds build lm1b .*"
                                        r"--file_format=array_record"):
    lm_bytes.TASK_SPECS["lm1b"].load({}, data_dir=str(tmp_path))
