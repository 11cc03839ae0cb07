"""The `lra_pathfinder` builder and task: generated configs, the LRA release layout, pixels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssm.config import ConfigError
from ssm.data import lra_pathfinder as lp
from ssm.data import pathfinder as pf
from ssm.data.lra_pathfinder import LraPathfinder, LraPathfinderConfig

tfds.disable_progress_bar()

GEN = dict(size=32, difficulty="hard", num_train=6, num_val=3, num_test=3, seed=4)
SETTINGS = dict(size=32, difficulty="hard", num_train=6, num_val=3, num_test=3, gen_seed=4,
                pixels="tokens")


def prepare(config, data_dir, manual_dir=None):
  builder = LraPathfinder(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def read_split(source):
  return [source[i] for i in range(len(source))]


def stacked(builder):
  examples = [ex for s in lp.SPLITS for ex in read_split(builder.as_data_source(s))]
  return (np.stack([ex["image"] for ex in examples]),
          np.array([int(ex["label"]) for ex in examples]))


def test_generated_splits_follow_the_generator_and_labels_match_the_pixels(tmp_path):
  builder = prepare(LraPathfinderConfig.generated(**GEN), tmp_path)
  assert [len(builder.as_data_source(s)) for s in lp.SPLITS] == [6, 3, 3]
  images, labels = stacked(builder)
  ref = pf.generate(12, size=32, difficulty="hard", seed=4)
  assert images.dtype == np.uint8 and images.shape == (12, 32, 32)
  np.testing.assert_array_equal(images, ref["images"])
  np.testing.assert_array_equal(labels, ref["labels"])
  gap = pf.resolve_settings(size=32, difficulty="hard").gap
  connected = [pf.markers_connected(im, m, gap=gap) for im, m in zip(images, ref["markers"])]
  np.testing.assert_array_equal(np.array(connected, dtype=int), labels)
  assert 0 < labels.sum() < 12  # both classes occur, so the check above can fail
  meta = builder.info.metadata
  assert meta["max_num_tokens"] == {s: 1024 for s in lp.SPLITS}
  offsets = {"train": (0, 6), "validation": (6, 9), "test": (9, 12)}
  for split, (lo, hi) in offsets.items():
    assert meta["label_counts"][split] == np.bincount(labels[lo:hi], minlength=2).tolist()


def test_generation_is_deterministic_and_seeded(tmp_path):
  a = prepare(LraPathfinderConfig.generated(**GEN), tmp_path / "a")
  again = prepare(LraPathfinderConfig.generated(**GEN), tmp_path / "b")
  other = LraPathfinderConfig.generated(**dict(GEN, seed=5))
  assert other.name == "gen_size32_hard_n6-3-3_seed5"
  b = prepare(other, tmp_path / "a")
  assert a.data_dir != b.data_dir
  np.testing.assert_array_equal(stacked(a)[0], stacked(again)[0])
  assert not np.array_equal(stacked(a)[0], stacked(b)[0])


def test_parallel_generation_equals_serial(monkeypatch):
  monkeypatch.setattr(lp, "_CHUNK", 4)  # 10 chunks of 4: two blocks of 8 with 2 workers
  settings = pf.resolve_settings(size=32, difficulty="easy")
  ref = pf.generate(43, size=32, difficulty="easy", seed=7)
  got = list(lp.generate_range(settings, 7, 3, 43, workers=2))
  assert len(got) == 40
  np.testing.assert_array_equal(np.stack([im for im, _ in got]), ref["images"][3:])
  assert [y for _, y in got] == ref["labels"][3:].tolist()


@pytest.mark.parametrize("pixels", ["tokens", "continuous"])
def test_task_examples(tmp_path, pixels):
  prepared = lp.TASK_SPECS["lra_pathfinder"].load(dict(SETTINGS, pixels=pixels),
                                                  data_dir=str(tmp_path), manual_dir=None)
  assert prepared.kind == "classify" and prepared.num_classes == 2
  assert {s: len(prepared.sources[s]) for s in lp.SPLITS} == {"train": 6, "validation": 3,
                                                              "test": 3}
  ref = pf.generate(12, size=32, difficulty="hard", seed=4)
  examples = [ex for s in lp.SPLITS for ex in read_split(prepared.sources[s])]
  assert [ex["label"] for ex in examples] == ref["labels"].tolist()
  tokens = np.stack([ex["tokens"] for ex in examples])
  if pixels == "tokens":
    assert (prepared.vocab_size, prepared.d_input) == (257, 0)
    assert tokens.dtype == np.int32 and tokens.shape == (12, 1024)
    assert tokens.min() >= 1 and tokens.max() < prepared.vocab_size
    np.testing.assert_array_equal(tokens, pf.to_tokens(ref["images"]))
  else:
    assert (prepared.vocab_size, prepared.d_input) == (0, 1)
    assert tokens.dtype == np.float32 and tokens.shape == (12, 1024, 1)
    assert tokens.min() >= -1 and tokens.max() <= 1
    np.testing.assert_allclose(tokens[..., 0], ref["images"].reshape(12, -1) / 127.5 - 1,
                               atol=1e-6)
  assert prepared.max_num_tokens == {s: 1024 for s in lp.SPLITS}
  assert sum(sum(c) for c in prepared.label_counts.values()) == 12


def test_encode_pixels_by_hand():
  image = np.array([[0, 255], [128, 1]], dtype=np.uint8)
  np.testing.assert_array_equal(lp.encode_pixels(image, "tokens"), [1, 256, 129, 2])
  np.testing.assert_allclose(lp.encode_pixels(image, "continuous"),
                             [[-1.0], [1.0], [1 / 255], [-253 / 255]], atol=1e-6)
  with pytest.raises(ValueError, match="pixels"):
    lp.encode_pixels(image, "rgb")


@pytest.mark.parametrize("field,value", [
    ("size", 4), ("difficulty", "medium"), ("pixels", "rgb"), ("num_train", 0),
    ("num_test", 1.5), ("gen_seed", -1)])
def test_bad_setting_is_named(tmp_path, field, value):
  with pytest.raises(ConfigError, match=f"data.{field}"):
    lp.load(dict(SETTINGS, **{field: value}), data_dir=str(tmp_path), manual_dir=None)


# ----------------------------------------------------------------------------------------------
# The LRA release layout.


def write_release(root, images, labels):
  """pathfinder32/curv_contour_length_14 with images written as imgs/<k // 5>/sample_<k>.png,
  row 3 an empty PNG and row 7 not a PNG; metadata split over 0.npy and 1.npy (text)."""
  base = root / "pathfinder32" / "curv_contour_length_14"
  rows = []
  for k, (image, label) in enumerate(zip(images, labels)):
    path = base / "imgs" / str(k // 5) / f"sample_{k}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if k == 3:
      path.write_bytes(b"")
    elif k == 7:
      path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    else:
      Image.fromarray(image).save(path)
    rows.append(f"imgs/{k // 5} sample_{k}.png {k} {label} 14")
  (base / "metadata").mkdir()
  (base / "metadata" / "0.npy").write_text("\n".join(rows[:6]) + "\n")
  (base / "metadata" / "1.npy").write_text("\n".join(rows[6:]) + "\n")
  return base


def test_release_split_is_a_fixed_80_10_10_permutation():
  parts = lp.release_split(20)
  assert [len(parts[s]) for s in lp.SPLITS] == [16, 2, 2]
  np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(20))
  np.testing.assert_array_equal(parts["train"], lp.release_split(20)["train"])
  assert not np.array_equal(parts["train"], np.arange(16))
  assert [len(lp.release_split(12)[s]) for s in lp.SPLITS] == [9, 1, 2]


def test_release_is_read_split_and_unreadable_images_counted(tmp_path, caplog):
  data = pf.generate(12, size=32, difficulty="hard", seed=9)
  base = write_release(tmp_path / "lra_release", data["images"], data["labels"])
  with caplog.at_level(logging.WARNING, logger=lp.__name__):
    builder = prepare(LraPathfinderConfig.release(size=32, difficulty="hard"),
                      tmp_path / "tfds", tmp_path / "lra_release")
  parts = lp.release_split(12)
  meta = builder.info.metadata
  for split, rows in parts.items():
    kept = [int(k) for k in rows if k not in (3, 7)]
    got = read_split(builder.as_data_source(split))
    assert len(got) == len(kept)
    for ex, k in zip(got, kept):
      np.testing.assert_array_equal(ex["image"], data["images"][k])
      assert int(ex["label"]) == int(data["labels"][k])
    assert meta["skipped"][split] == len(rows) - len(kept)
    assert meta["label_counts"][split] == np.bincount(data["labels"][kept], minlength=2).tolist()
    bad = [int(k) for k in rows if k in (3, 7)]
    warned = [r.getMessage() for r in caplog.records if f" {split} images" in r.getMessage()]
    if bad:  # one warning per split, with the count and the first unreadable file
      assert len(warned) == 1
      assert f"skipped {len(bad)} of {len(rows)} {split}" in warned[0]
      assert f"{base}/imgs/{bad[0] // 5}/sample_{bad[0]}.png" in warned[0]
    else:
      assert not warned
  assert sum(meta["skipped"].values()) == 2
  # Same files, another data_dir: the same splits.
  again = prepare(LraPathfinderConfig.release(size=32, difficulty="hard"), tmp_path / "tfds2",
                  tmp_path / "lra_release")
  np.testing.assert_array_equal(stacked(builder)[0], stacked(again)[0])
  # Through the task: manual_dir given -> the release (the generator counts are not used).
  prepared = lp.load(SETTINGS, data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(tmp_path / "lra_release"))
  assert sum(len(prepared.sources[s]) for s in lp.SPLITS) == 10
  assert prepared.sources["test"][0]["tokens"].shape == (1024,)


def test_release_errors_name_the_file(tmp_path):
  data = pf.generate(4, size=32, difficulty="hard", seed=9)
  base = write_release(tmp_path / "lra_release", data["images"], data["labels"])
  config = LraPathfinderConfig.release(size=32, difficulty="hard")
  with pytest.raises(FileNotFoundError, match="manual directory"):
    prepare(config, tmp_path / "tfds", tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="pathfinder32/curv_baseline/metadata"):
    prepare(LraPathfinderConfig.release(size=32, difficulty="easy"), tmp_path / "tfds",
            tmp_path / "lra_release")
  (base / "metadata" / "1.npy").write_text("imgs/0 sample_0.png 0 1 14\nimgs/0 sample_1.png 0\n")
  with pytest.raises(ValueError, match=r"1\.npy:2"):
    prepare(config, tmp_path / "tfds", tmp_path / "lra_release")
