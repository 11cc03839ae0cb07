"""The `npz_classification` task (`ssm.data.arrays`) on .npz/.npy files the tests write."""

from __future__ import annotations

import numpy as np
import pytest

from ssm.config import ConfigError
from ssm.data import arrays
from ssm.data.prepared import SPLITS


def load(**settings):
  return arrays.load({**arrays.FIELDS, **settings}, data_dir=None, manual_dir=None)


def read(prepared, split):
  src = prepared.sources[split]
  return [src[i] for i in range(len(src))]


def write_npz(path, **named):
  np.savez(path, **named)
  return str(path)


def test_fields_and_spec():
  spec = arrays.TASK_SPECS["npz_classification"]
  assert spec.kind == "classify" and spec.fields is arrays.FIELDS
  assert arrays.FIELDS == {"train_file": None, "test_file": None, "val_file": None,
                           "val_fraction": 0.1, "x_key": "x", "y_key": "y",
                           "lengths_key": "lengths", "num_classes": 0}


def test_int_sequences_become_token_ids_plus_one(tmp_path):
  x_train = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [2, 2, 2]], dtype=np.int64)
  y_train = np.array([0, 1, 2, 1])
  x_test = np.array([[9, 0, 1]], dtype=np.uint8)
  prepared = load(train_file=write_npz(tmp_path / "train.npz", x=x_train, y=y_train),
                  val_file=write_npz(tmp_path / "val.npz", x=x_train[:2], y=y_train[:2]),
                  test_file=write_npz(tmp_path / "test.npz", x=x_test, y=np.array([4])))
  assert prepared.kind == "classify"
  assert prepared.vocab_size == 11  # ids 0..9 -> tokens 1..10
  assert prepared.num_classes == 5  # label 4 of the test file
  assert prepared.d_input == 0
  assert prepared.max_num_tokens == {"train": 3, "validation": 3, "test": 3}
  assert prepared.label_counts == {"train": [1, 2, 1, 0, 0], "validation": [1, 1, 0, 0, 0],
                                   "test": [0, 0, 0, 0, 1]}
  train = read(prepared, "train")
  assert [e["label"] for e in train] == [0, 1, 2, 1]
  for e, x in zip(train, x_train):
    assert e["tokens"].dtype == np.int32
    np.testing.assert_array_equal(e["tokens"], x + 1)
  np.testing.assert_array_equal(read(prepared, "test")[0]["tokens"], [10, 1, 2])
  assert len(read(prepared, "validation")) == 2


def test_lengths_cut_padded_sequences_and_padding_is_not_read(tmp_path):
  x = np.array([[5, 6, -1, -1], [1, 2, 3, 4], [7, -1, -1, -1]])  # -1 padding is never read
  lengths = np.array([2, 4, 1])
  path = write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0]), lengths=lengths)
  prepared = load(train_file=path, val_file=path, test_file=path)
  got = [e["tokens"].tolist() for e in read(prepared, "test")]
  assert got == [[6, 7], [2, 3, 4, 5], [8]]
  assert prepared.vocab_size == 9 and prepared.max_num_tokens["test"] == 4
  # lengths_key=None ignores the lengths array, so the padding is read and rejected.
  with pytest.raises(ConfigError, match=r"example 0 holds the token id -1"):
    load(train_file=path, val_file=path, test_file=path, lengths_key=None)


def test_float_sequences_and_features(tmp_path):
  rng = np.random.default_rng(0)
  x2 = rng.normal(size=(4, 5)).astype(np.float64)
  x3 = rng.normal(size=(4, 5, 3)).astype(np.float32)
  y = np.array([1, 0, 1, 0])
  for x, d in ((x2, 1), (x3, 3)):
    path = write_npz(tmp_path / f"f{d}.npz", x=x, y=y)
    prepared = load(train_file=path, val_file=path, test_file=path)
    assert prepared.vocab_size == 0 and prepared.d_input == d and prepared.num_classes == 2
    for e, ref in zip(read(prepared, "train"), x):
      assert e["tokens"].dtype == np.float32 and e["tokens"].shape == (5, d)
      np.testing.assert_allclose(e["tokens"], ref.reshape(5, d).astype(np.float32))
  nan_x = x3.copy()
  nan_x[2, 4, 1] = np.nan
  path = write_npz(tmp_path / "nan.npz", x=nan_x, y=y)
  with pytest.raises(ConfigError, match=r"nan\.npz\['x'\]: example 2 has a non-finite") as info:
    load(train_file=path, test_file=path)
  assert info.value.field == "data.train_file"


def test_images_become_pixel_sequences(tmp_path):
  gray = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 10  # [N=2, H=2, W=3]
  path = write_npz(tmp_path / "gray.npz", x=gray, y=np.array([0, 1]))
  prepared = load(train_file=path, val_file=path, test_file=path)
  assert prepared.d_input == 1 and prepared.vocab_size == 0
  assert prepared.max_num_tokens["train"] == 6
  e = read(prepared, "train")[1]
  np.testing.assert_allclose(e["tokens"][:, 0], np.array([60, 70, 80, 90, 100, 110]) / 255,
                             rtol=1e-6)
  rgb = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)  # [N, H, W, C]
  path = write_npz(tmp_path / "rgb.npz", x=rgb, y=np.array([1, 1]))
  prepared = load(train_file=path, val_file=path, test_file=path)
  assert prepared.d_input == 3 and prepared.num_classes == 2
  e = read(prepared, "test")[1]
  assert e["tokens"].shape == (4, 3)
  np.testing.assert_allclose(e["tokens"], rgb[1].reshape(4, 3) / 255, rtol=1e-6)
  # Float images with channels are taken as they are.
  path = write_npz(tmp_path / "frgb.npz", x=rgb.astype(np.float32) - 5, y=np.array([1, 0]))
  e = read(load(train_file=path, val_file=path, test_file=path), "test")[0]
  np.testing.assert_array_equal(e["tokens"], rgb[0].reshape(4, 3).astype(np.float32) - 5)
  bad = np.full((2, 2, 2), 300, dtype=np.int16)
  path = write_npz(tmp_path / "bad.npz", x=bad, y=np.array([0, 1]))
  with pytest.raises(ConfigError, match=r"bad\.npz\['x'\]: example 0 has a pixel value"):
    load(train_file=path, test_file=path)


def test_npy_files_with_sibling_labels_and_lengths(tmp_path, monkeypatch):
  calls = []
  real_load = np.load
  monkeypatch.setattr(np, "load", lambda path, **kw: calls.append((str(path), kw)) or
                      real_load(path, **kw))
  x = np.array([[1, 2, 3], [4, 5, 0], [6, 0, 0]], dtype=np.int32)
  np.save(tmp_path / "train_x.npy", x)
  np.save(tmp_path / "train_y.npy", np.array([[2], [0], [1]]))  # [N, 1] labels
  np.save(tmp_path / "train_lengths.npy", np.array([3, 2, 1]))
  (tmp_path / "test").mkdir()
  np.save(tmp_path / "test" / "x.npy", x[:2])
  np.save(tmp_path / "test" / "y.npy", np.array([1.0, 0.0]))  # whole floats are labels too
  prepared = load(train_file=str(tmp_path / "train_x.npy"), val_file=str(tmp_path /
                  "train_x.npy"), test_file=str(tmp_path / "test" / "x.npy"))
  assert [e["tokens"].tolist() for e in read(prepared, "train")] == [[2, 3, 4], [5, 6], [7]]
  assert [e["label"] for e in read(prepared, "train")] == [2, 0, 1]
  assert [e["tokens"].tolist() for e in read(prepared, "test")] == [[2, 3, 4], [5, 6, 1]]
  assert prepared.num_classes == 3 and prepared.vocab_size == 8
  assert prepared.max_num_tokens == {"train": 3, "validation": 3, "test": 3}
  assert {kw.get("mmap_mode") for path, kw in calls if path.endswith("x.npy")} == {"r"}
  with pytest.raises(ConfigError, match=r"must be named x\.npy or <prefix>_x\.npy"):
    np.save(tmp_path / "inputs.npy", x)
    load(train_file=str(tmp_path / "inputs.npy"), test_file=str(tmp_path / "test" / "x.npy"))
  np.save(tmp_path / "lonely_x.npy", x)
  with pytest.raises(ConfigError, match=r"lonely_y\.npy \(data\.y_key\) does not exist"):
    load(train_file=str(tmp_path / "lonely_x.npy"), test_file=str(tmp_path / "test" / "x.npy"))


def test_validation_carved_from_train_by_a_fixed_permutation(tmp_path):
  n = 50
  x = np.arange(n)[:, None].repeat(4, axis=1)  # example i is all i
  path = write_npz(tmp_path / "t.npz", x=x, y=np.arange(n) % 3)
  first = load(train_file=path, test_file=path, val_fraction=0.2)
  again = load(train_file=path, test_file=path, val_fraction=0.2)
  ids = {s: [int(e["tokens"][0]) - 1 for e in read(first, s)] for s in SPLITS}
  assert ids == {s: [int(e["tokens"][0]) - 1 for e in read(again, s)] for s in SPLITS}
  assert len(ids["validation"]) == 10 and len(ids["train"]) == 40
  assert sorted(ids["train"] + ids["validation"]) == list(range(n))
  assert ids["validation"] == sorted(ids["validation"]) != list(range(10))
  perm = np.random.default_rng(arrays.VAL_SEED).permutation(n)
  assert ids["validation"] == sorted(perm[:10].tolist())
  assert ids["test"] == list(range(n))
  counts = np.bincount(np.array(ids["validation"]) % 3, minlength=3).tolist()
  assert first.label_counts["validation"] == counts
  with pytest.raises(ConfigError) as info:
    load(train_file=path, test_file=path, val_fraction=0.001)
  assert info.value.field == "data.val_fraction"


@pytest.mark.parametrize("case, field, message", [
    ("no_y", "data.train_file", r"t\.npz has no array 'y' \(data\.y_key\); it holds 'x'"),
    ("n_mismatch", "data.train_file", r"t\.npz\['y'\] has 3 labels but .*t\.npz\['x'\] has 4"),
    ("float_labels", "data.train_file", r"label of example 2 is 1\.5, not an integer"),
    ("negative_label", "data.train_file", r"label of example 1 is -1, negative"),
    ("negative_id", "data.train_file", r"t\.npz\['x'\]: example 3 holds the token id -2"),
    ("bad_lengths", "data.train_file", r"length of example 0 is 5, not in 1\.\.3"),
    ("image_lengths", "data.train_file", r"lengths are for padded sequences"),
    ("num_classes", "data.num_classes", r"example 2 has the label 2, not below"),
    ("mixed", "data.test_file", r"holds 1 feature per step .* holds token ids"),
    ("missing", "data.test_file", r"no such file: .*nope\.npz"),
    ("not_npz", "data.train_file", r"t\.npz: not a readable \.npz file"),
    ("suffix", "data.train_file", r"expected a \.npz or \.npy file"),
    ("no_train", "data.train_file", r"must be a path"),
    ("x_key", "data.x_key", r"non-empty string"),
])
def test_errors_name_the_field_file_and_array(tmp_path, case, field, message):
  x = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
  y = np.array([0, 1, 2, 0])
  good = write_npz(tmp_path / "good.npz", x=x, y=y)
  settings = {"train_file": str(tmp_path / "t.npz"), "test_file": good}
  contents = {
      "no_y": dict(x=x), "n_mismatch": dict(x=x, y=y[:3]),
      "float_labels": dict(x=x, y=np.array([0.0, 1.0, 1.5, 0.0])),
      "negative_label": dict(x=x, y=np.array([0, -1, 1, 0])),
      "negative_id": dict(x=np.where(np.arange(4)[:, None] == 3, -2, x), y=y),
      "bad_lengths": dict(x=x, y=y, lengths=np.array([5, 1, 1, 1])),
      "image_lengths": dict(x=x[:, :, None].repeat(2, axis=2), y=y, lengths=np.ones(4, int)),
  }
  if case in contents:
    np.savez(tmp_path / "t.npz", **contents[case])
  elif case == "num_classes":
    np.savez(tmp_path / "t.npz", x=x, y=y)
    settings["num_classes"] = 2
  elif case == "mixed":
    np.savez(tmp_path / "t.npz", x=x, y=y)
    settings["test_file"] = write_npz(tmp_path / "f.npz", x=x.astype(np.float32), y=y)
  elif case == "missing":
    np.savez(tmp_path / "t.npz", x=x, y=y)
    settings["test_file"] = str(tmp_path / "nope.npz")
  elif case == "not_npz":
    (tmp_path / "t.npz").write_text("label\tvalue\n")
  elif case == "suffix":
    (tmp_path / "t.csv").write_text("1,2\n")
    settings["train_file"] = str(tmp_path / "t.csv")
  elif case == "no_train":
    settings["train_file"] = None
  elif case == "x_key":
    np.savez(tmp_path / "t.npz", x=x, y=y)
    settings["x_key"] = ""
  with pytest.raises(ConfigError, match=message) as info:
    load(**settings)
  assert info.value.field == field
