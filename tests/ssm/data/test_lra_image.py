"""The "lra_image" task: CIFAR-10 (TFDS mock data) as grayscale pixel sequences."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data import lra_image

SPLITS = ("train", "validation", "test")
NUM_MOCK = 40


def load(tmp_path, **settings):
  return lra_image.load({"num_val": 8, "pixels": "tokens", **settings},
                        data_dir=str(tmp_path), manual_dir=None)


def raw(split, tmp_path):
  return tfds.data_source("cifar10", split=split, data_dir=str(tmp_path), download=False)


def test_grayscale_by_hand():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                  [[255, 255, 255], [10, 20, 30], [0, 0, 0]]], dtype=np.uint8)
  # 0.299 * 255 = 76.245, 0.587 * 255 = 149.685, 0.114 * 255 = 29.07,
  # 0.299 * 10 + 0.587 * 20 + 0.114 * 30 = 2.99 + 11.74 + 3.42 = 18.15
  np.testing.assert_array_equal(lra_image.grayscale(rgb), [[76, 150, 29], [255, 18, 0]])
  assert lra_image.grayscale(rgb).dtype == np.uint8
  with pytest.raises(ValueError, match="RGB"):
    lra_image.grayscale(rgb[..., :2])


def test_tokens_are_the_grayscale_of_the_cifar_image(tmp_path):
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    prepared = load(tmp_path)
    assert (prepared.kind, prepared.num_classes) == ("classify", 10)
    assert (prepared.vocab_size, prepared.d_input) == (257, 0)
    test = raw("test", tmp_path)
    for i in (0, 5):
      image = np.asarray(test[i]["image"])
      assert image.shape == (32, 32, 3)
      r, g, b = (int(v) for v in image[3, 17])  # row 3, column 17 -> token 3 * 32 + 17
      ex = prepared.sources["test"][i]
      assert ex["tokens"][3 * 32 + 17] == round(0.299 * r + 0.587 * g + 0.114 * b) + 1
      np.testing.assert_array_equal(ex["tokens"], lra_image.grayscale(image).reshape(-1) + 1)
      assert ex["label"] == int(test[i]["label"])
    for split in SPLITS:
      for ex in (prepared.sources[split][j] for j in range(len(prepared.sources[split]))):
        assert ex["tokens"].dtype == np.int32 and ex["tokens"].shape == (1024,)
        assert 1 <= ex["tokens"].min() and ex["tokens"].max() < 257
        assert 0 <= ex["label"] < 10
    assert prepared.max_num_tokens == {s: 1024 for s in SPLITS}


def test_validation_is_a_fixed_part_of_train(tmp_path):
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    a, b = load(tmp_path), load(tmp_path)
    train = raw("train", tmp_path)
    sizes = {s: len(a.sources[s]) for s in SPLITS}
    assert sizes == {"train": NUM_MOCK - 8, "validation": 8, "test": NUM_MOCK}
    train_idx, val_idx = lra_image.validation_indices(NUM_MOCK, 8)
    assert sorted(set(train_idx) | set(val_idx)) == list(range(NUM_MOCK))
    assert not set(train_idx) & set(val_idx)
    assert list(val_idx) != list(range(8))  # permuted, not the first 8
    for split, indices in (("train", train_idx), ("validation", val_idx)):
      for j in (0, len(indices) - 1):
        expected = lra_image.grayscale(np.asarray(train[int(indices[j])]["image"]))
        np.testing.assert_array_equal(a.sources[split][j]["tokens"], expected.reshape(-1) + 1)
        np.testing.assert_array_equal(a.sources[split][j]["tokens"],
                                      b.sources[split][j]["tokens"])


def test_continuous_pixels(tmp_path):
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    tokens = load(tmp_path)
    features = load(tmp_path, pixels="continuous")
    assert (features.vocab_size, features.d_input) == (0, 1)
    x = features.sources["validation"][3]["tokens"]
    assert x.dtype == np.float32 and x.shape == (1024, 1)
    assert -1 <= x.min() and x.max() <= 1
    t = tokens.sources["validation"][3]["tokens"]
    np.testing.assert_allclose(x[:, 0], ((t - 1) / 255 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("settings,field", [
    ({"num_val": 0}, "data.num_val"), ({"num_val": NUM_MOCK}, "data.num_val"),
    ({"pixels": "rgb"}, "data.pixels")])
def test_bad_setting_is_named(tmp_path, settings, field):
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    with pytest.raises(ConfigError, match=field):
      load(tmp_path, **settings)


def test_manual_dir_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="data.manual_dir"):
    lra_image.load({"num_val": 8, "pixels": "tokens"}, data_dir=str(tmp_path),
                   manual_dir=str(tmp_path))


def test_unprepared_cifar10_says_how_to_build_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="--file_format=array_record") as info:
    load(tmp_path)
  assert f"tfds build cifar10 --data_dir {tmp_path}" in str(info.value)
