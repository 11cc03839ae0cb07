"""The `lra_retrieval` builder and task, from small AAN pairs TSV files the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data.lra_retrieval import (RELEASE_FILES, TASK_SPECS, LraRetrieval, LraRetrievalConfig,
                                    read_pairs_tsv)

tfds.disable_progress_bar()

# (label as written, id1, id2, text1, text2); the release spells texts as b'...' literals.
ROWS = {
    "train": [("1.0", "P1", "P2", "b'Attention is all'", "b'we need'"),
              ("0.0", "P3", "P4", "café au lait", "x"),
              ("1", "P5", "P6", "short", "a much longer second document"),
              ("0", "P7", "P8", "b'It\\'s \\xe2\\x80\\x94 escaped'", "tail")],
    "validation": [("0.0", "V1", "V2", "left", "right"), ("1.0", "V3", "V4", "up", "down")],
    "test": [("1.0", "T1", "T2", "naïve", "résumé"), ("1.0", "T3", "T4", "one", "two"),
             ("0.0", "T5", "T6", "three", "four")],
}


def write_release(manual_dir, rows=None, newline="\n"):
  manual_dir.mkdir(parents=True, exist_ok=True)
  for split, split_rows in (rows or ROWS).items():
    text = "".join("\t".join(row) + newline for row in split_rows)
    (manual_dir / RELEASE_FILES[split]).write_bytes(text.encode("utf-8"))


def prepare(data_dir, manual_dir, max_length=4000):
  builder = LraRetrieval(config=LraRetrievalConfig.make(max_length), data_dir=str(data_dir),
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def read_split(builder, split):
  src = builder.as_data_source(split)
  return [(np.asarray(src[i]["tokens"]), np.asarray(src[i]["tokens2"]), int(src[i]["label"]))
          for i in range(len(src))]


def byte_tokens(text, max_length=4000):
  return [b + 1 for b in text.encode("utf-8")[:max_length]]


def test_rows_become_byte_tokens_in_file_order(tmp_path):
  write_release(tmp_path / "manual")
  builder = prepare(tmp_path / "tfds", tmp_path / "manual")
  meta = builder.info.metadata
  for split, rows in ROWS.items():
    got = read_split(builder, split)
    assert len(got) == len(rows)
    for (tokens, tokens2, label), row in zip(got, rows):
      assert tokens.dtype == tokens2.dtype == np.int32
      assert tokens.tolist() == byte_tokens(row[3]) and tokens2.tolist() == byte_tokens(row[4])
      assert label == int(float(row[0]))
      assert 1 <= min(tokens.min(), tokens2.min()) and max(tokens.max(), tokens2.max()) <= 256
    labels = [int(float(r[0])) for r in rows]
    assert meta["label_counts"][split] == np.bincount(labels, minlength=2).tolist()
    assert meta["max_num_tokens"][split] == max(
        len(r[i].encode("utf-8")) for r in rows for i in (3, 4))
  # The literal is kept as written: "b'", backslash escapes and all.
  assert read_split(builder, "train")[3][0][:5].tolist() == [ord(c) + 1 for c in "b'It\\"]


def test_truncation_and_a_folder_per_max_length(tmp_path):
  write_release(tmp_path / "manual", newline="\r\n")
  config = LraRetrievalConfig.make(5)
  assert config.name == "bytes_len5" and LraRetrievalConfig.make(5) is config
  short = prepare(tmp_path / "tfds", tmp_path / "manual", max_length=5)
  full = prepare(tmp_path / "tfds", tmp_path / "manual")
  assert short.data_dir != full.data_dir
  for (tokens, tokens2, _), row in zip(read_split(short, "train"), ROWS["train"]):
    assert tokens.tolist() == byte_tokens(row[3], 5) and tokens2.tolist() == byte_tokens(row[4], 5)
  assert short.info.metadata["max_num_tokens"] == {"train": 5, "validation": 5, "test": 5}
  # "\r\n" line ends are not part of the last document.
  assert read_split(full, "test")[0][1].tolist() == byte_tokens("résumé")


def test_same_files_same_data(tmp_path):
  write_release(tmp_path / "manual")
  a = prepare(tmp_path / "a", tmp_path / "manual")
  b = prepare(tmp_path / "b", tmp_path / "manual")
  for split in RELEASE_FILES:
    for x, y in zip(read_split(a, split), read_split(b, split), strict=True):
      np.testing.assert_array_equal(x[0], y[0])
      np.testing.assert_array_equal(x[1], y[1])
      assert x[2] == y[2]
  assert a.info.metadata == b.info.metadata


@pytest.mark.parametrize("bad_line,message", [
    ("1\tV5\tV6\tonly four", "expected 5 tab-separated columns"),
    ("1\tV5\tV6\ttext\twith\ttab", "expected 5 tab-separated columns"),
    ("2\tV5\tV6\ta\tb", "label '2' is not 0 or 1"),
    ("0.5\tV5\tV6\ta\tb", "label '0.5' is not 0 or 1"),
    ("yes\tV5\tV6\ta\tb", "label 'yes' is not 0 or 1"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
  write_release(tmp_path / "manual")
  path = tmp_path / "manual" / "new_aan_pairs.eval.tsv"
  lines = path.read_text().splitlines()
  lines.insert(1, "")  # a blank line 2 is skipped but counted
  lines.insert(2, bad_line)  # so this is line 3
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message) as info:
    prepare(tmp_path / "tfds", tmp_path / "manual")
  assert "new_aan_pairs.eval.tsv:3:" in str(info.value)


def test_blank_lines_are_skipped(tmp_path):
  path = tmp_path / "pairs.tsv"
  path.write_text("1.0\ta\tb\tx\ty\n\n0\tc\td\tz\tw\n\n")
  pairs = list(read_pairs_tsv(path, 10))
  assert [(t.tolist(), t2.tolist(), label) for t, t2, label in pairs] == [
      ([ord("x") + 1], [ord("y") + 1], 1), ([ord("z") + 1], [ord("w") + 1], 0)]


def test_missing_file_names_the_path_and_the_release(tmp_path):
  write_release(tmp_path / "manual", {s: ROWS[s] for s in ("train", "validation")})
  with pytest.raises(FileNotFoundError) as info:
    prepare(tmp_path / "tfds", tmp_path / "manual")
  assert str(tmp_path / "manual" / "new_aan_pairs.test.tsv") in str(info.value)
  assert "lra_release.gz" in str(info.value) and "tsv_data" in str(info.value)


def test_missing_manual_dir_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.manual_dir") as info:
    TASK_SPECS["lra_retrieval"].load({"max_length": 8}, data_dir=str(tmp_path / "tfds"),
                                     manual_dir=str(tmp_path / "nowhere"))
  assert "nowhere" in str(info.value) and "lra_release.gz" in str(info.value)


def test_task_load(tmp_path):
  spec = TASK_SPECS["lra_retrieval"]
  assert spec.kind == "retrieval" and spec.fields == {"max_length": 4000}
  write_release(tmp_path / "manual")
  prepared = spec.load({"max_length": 8}, data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(tmp_path / "manual"))
  assert (prepared.kind, prepared.vocab_size, prepared.num_classes, prepared.unit) == (
      "retrieval", 257, 2, "byte")
  assert {s: len(prepared.sources[s]) for s in RELEASE_FILES} == {
      "train": 4, "validation": 2, "test": 3}
  assert prepared.label_counts["test"] == [1, 2] and prepared.max_num_tokens["train"] == 8
  ex = prepared.sources["validation"][1]
  assert ex["tokens"].tolist() == byte_tokens("up") and ex["tokens2"].tolist() == byte_tokens(
      "down") and int(ex["label"]) == 1
  # Written once: a later load needs no manual_dir.
  again = spec.load({"max_length": 8}, data_dir=str(tmp_path / "tfds"), manual_dir=None)
  assert again.label_counts == prepared.label_counts
  with pytest.raises(ConfigError, match="data.max_length"):
    spec.load({"max_length": 0}, data_dir=str(tmp_path / "tfds"), manual_dir=None)
