"""The `lra_listops` TFDS builder: generated configs and the LRA release TSV files."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.data import listops
from ssm.data.lra_listops import LraListops, LraListopsConfig

tfds.disable_progress_bar()

GEN = dict(num_train=20, num_val=6, num_test=5, min_length=5, max_length=40, max_depth=3,
           max_args=4, seed=2)


def prepare(config, data_dir, manual_dir=None):
  builder = LraListops(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def read_split(builder, split):
  src = builder.as_data_source(split)
  return [(np.asarray(src[i]["tokens"]), int(src[i]["label"])) for i in range(len(src))]


def lra_text(text: str) -> str:
  """The LRA release spelling: every operator application folded into left-nested pairs
  "( ( [OP a ) b ) ... ] )"."""
  def parse(toks, i):
    if not toks[i].startswith("["):
      return toks[i], i + 1
    op, i = toks[i], i + 1
    args = []
    while toks[i] != "]":
      arg, i = parse(toks, i)
      args.append(arg)
    pair = f"( {op} {args[0]} )"
    for arg in args[1:]:
      pair = f"( {pair} {arg} )"
    return f"( {pair} ] )", i + 1
  out, end = parse(text.split(), 0)
  assert end == len(text.split())
  return out


def test_generated_splits_follow_the_generator_stream(tmp_path):
  config = LraListopsConfig.generated(**GEN)
  builder = prepare(config, tmp_path)
  stream = list(listops.generate(31, min_length=5, max_length=40, max_depth=3, max_args=4,
                                 seed=2, operator_prob=config.operator_prob))
  got = (read_split(builder, "train") + read_split(builder, "validation")
         + read_split(builder, "test"))
  assert [len(read_split(builder, s)) for s in ("train", "validation", "test")] == [20, 6, 5]
  assert len(got) == len(stream)
  for (tokens, label), (ref_tokens, ref_label) in zip(got, stream):
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert label == ref_label == listops.evaluate_tokens(tokens)
  meta = builder.info.metadata
  for split in ("train", "validation", "test"):
    labels = [l for _, l in read_split(builder, split)]
    assert meta["label_counts"][split] == np.bincount(labels, minlength=10).tolist()
    assert meta["max_num_tokens"][split] == max(t.size for t, _ in read_split(builder, split))


def test_generated_settings_get_their_own_folder(tmp_path):
  a = LraListopsConfig.generated(**GEN)
  b = LraListopsConfig.generated(**dict(GEN, seed=3))
  assert a.name != b.name and "seed2" in a.name and "len5-40" in a.name
  ba, bb = prepare(a, tmp_path), prepare(b, tmp_path)
  assert ba.data_dir != bb.data_dir
  ta, tb = read_split(ba, "train"), read_split(bb, "train")
  assert any(not np.array_equal(x, y) for (x, _), (y, _) in zip(ta, tb))
  # Reopening the same settings reuses the written data and its metadata.
  again = LraListops(config=LraListopsConfig.generated(**GEN), data_dir=str(tmp_path),
                     file_format="array_record")
  assert again.info.metadata["label_counts"] == ba.info.metadata["label_counts"]


def write_release(manual_dir, rows_by_split):
  manual_dir.mkdir(parents=True, exist_ok=True)
  names = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}
  for split, rows in rows_by_split.items():
    lines = ["Source\tTarget"] + [f"{src}\t{tgt}" for src, tgt in rows]
    (manual_dir / names[split]).write_text("\n".join(lines) + "\n")


def test_release_files_are_read_in_order(tmp_path):
  rows = {}
  for k, split in enumerate(("train", "validation", "test")):
    exprs = list(listops.generate(7 - k, min_length=4, max_length=30, max_depth=3, max_args=3,
                                  seed=10 + k))
    rows[split] = [(lra_text(listops.detokenize(t)), l) for t, l in exprs]
  assert "(" in rows["train"][0][0]
  write_release(tmp_path / "manual", rows)
  builder = prepare(LraListopsConfig.release(), tmp_path / "tfds", tmp_path / "manual")
  for split, expected in rows.items():
    got = read_split(builder, split)
    assert len(got) == len(expected)
    for (tokens, label), (src, tgt) in zip(got, expected):
      assert listops.detokenize(tokens) == " ".join(
          t for t in src.split() if t not in ("(", ")"))
      assert label == tgt == listops.evaluate_tokens(tokens)


GOOD = ("( ( [MAX 2 ) 9 ] )", 9)


@pytest.mark.parametrize("bad_line,message", [
    ("( ( [MAX 2 ) 9 ] )\t9\textra", "expected 2 tab-separated columns"),
    ("( ( [MAX 2 ) 9 ] )", "expected 2 tab-separated columns"),
    ("( ( [MAX 2 ) 9 ] )\tnine", "not an integer"),
    ("( ( [MAX 2 ) 9 ] )\t10", "outside 0..9"),
    ("( ( [ADD 2 ) 9 ] )\t1", "unknown ListOps token"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
  rows = {s: [GOOD, GOOD] for s in ("train", "validation", "test")}
  write_release(tmp_path / "manual", rows)
  path = tmp_path / "manual" / "basic_val.tsv"
  lines = path.read_text().splitlines()
  lines.insert(2, bad_line)  # header is line 1, so this is line 3
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message) as info:
    prepare(LraListopsConfig.release(), tmp_path / "tfds", tmp_path / "manual")
  assert "basic_val.tsv:3:" in str(info.value)


def test_bad_header_is_reported(tmp_path):
  write_release(tmp_path / "manual", {s: [GOOD] for s in ("train", "validation", "test")})
  path = tmp_path / "manual" / "basic_test.tsv"
  path.write_text(path.read_text().replace("Source\tTarget", "src\tlabel"))
  with pytest.raises(ValueError, match=r"basic_test\.tsv:1: expected the header"):
    prepare(LraListopsConfig.release(), tmp_path / "tfds", tmp_path / "manual")


def test_missing_release_file_names_the_expected_path(tmp_path):
  write_release(tmp_path / "manual", {s: [GOOD] for s in ("train", "validation")})
  expected = str(tmp_path / "manual" / "basic_test.tsv")
  with pytest.raises(FileNotFoundError, match=expected):
    prepare(LraListopsConfig.release(), tmp_path / "tfds", tmp_path / "manual")


def test_missing_manual_dir_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="basic_train.tsv"):
    prepare(LraListopsConfig.release(), tmp_path / "tfds", tmp_path / "nowhere")
