"""Task `lra_text`: IMDB reviews (mocked `tfds.data_source`) as byte tokens, and its splits."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data import lra_text
from ssm.data.lra_text import BYTE_OFFSET, TASK_SPECS, VOCAB_SIZE, encode_bytes

tfds.disable_progress_bar()

SETTINGS = dict(TASK_SPECS["lra_text"].fields)


def test_task_spec():
  spec = TASK_SPECS["lra_text"]
  assert spec.kind == "classify"
  assert spec.fields == {"max_length": 4096, "num_val": 2500}
  assert VOCAB_SIZE == 257 and BYTE_OFFSET == 1


def test_encode_bytes_is_utf8_plus_one():
  np.testing.assert_array_equal(encode_bytes("Ab é", 100), [66, 99, 33, 0xC3 + 1, 0xA9 + 1])
  np.testing.assert_array_equal(encode_bytes(b"\x00\xff", 100), [1, 256])
  np.testing.assert_array_equal(encode_bytes(np.array(b"abc", dtype=object), 2), [98, 99])
  tokens = encode_bytes("é" * 3, 3)  # cut inside the second character, as LRA does
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [0xC4, 0xAA, 0xC4])
  assert encode_bytes("", 5).shape == (0,)
  with pytest.raises(TypeError, match="str or bytes"):
    encode_bytes(5, 3)


def _reviews(n: int, prefix: str) -> list[dict]:
  return [{"text": f"{prefix} review {i}: ça va".encode(), "label": np.int64(i % 2)}
          for i in range(n)]


FAKE = {"train": _reviews(10, "train"), "test": _reviews(4, "test")}


def _fake_source(self, split, **kwargs):
  del self, kwargs
  return FAKE[split]


def load(tmp_path, **settings):
  with tfds.testing.mock_data(as_data_source_fn=_fake_source):
    return lra_text.load({**SETTINGS, **settings}, data_dir=str(tmp_path), manual_dir=None)


def test_known_reviews_become_their_bytes(tmp_path):
  prepared = load(tmp_path, num_val=3)
  assert (prepared.kind, prepared.vocab_size, prepared.num_classes, prepared.unit) == (
      "classify", 257, 2, "byte")
  test = prepared.sources["test"]
  assert len(test) == 4
  for i in range(4):
    text = f"test review {i}: ça va".encode()
    assert test[i]["tokens"].tolist() == [b + 1 for b in text]
    assert test[i]["label"] == i % 2
  # Truncation keeps the first max_length bytes.
  short = load(tmp_path, num_val=3, max_length=6).sources["test"][1]
  assert short["tokens"].tolist() == [b + 1 for b in b"test r"]


def test_validation_is_a_fixed_part_of_train(tmp_path):
  prepared = load(tmp_path, num_val=3)
  train, val = prepared.sources["train"], prepared.sources["validation"]
  assert (len(train), len(val)) == (7, 3)

  def ids(source):
    return [bytes((source[i]["tokens"] - 1).astype(np.uint8).tolist()).decode()
            for i in range(len(source))]

  train_ids, val_ids = ids(train), ids(val)
  assert sorted(train_ids + val_ids) == sorted(ex["text"].decode() for ex in FAKE["train"])
  assert not set(train_ids) & set(val_ids)
  # Same settings, same split; each side keeps the file order.
  again = load(tmp_path, num_val=3)
  assert ids(again.sources["train"]) == train_ids and ids(again.sources["validation"]) == val_ids
  order = [ex["text"].decode() for ex in FAKE["train"]]
  assert train_ids == sorted(train_ids, key=order.index)
  # The fixed permutation, not the first num_val reviews.
  assert val_ids != order[:3]


def test_num_val_zero_validates_on_test(tmp_path):
  prepared = load(tmp_path, num_val=0)
  assert len(prepared.sources["train"]) == 10
  assert prepared.sources["validation"] is prepared.sources["test"]


@pytest.mark.parametrize("field,value", [("num_val", 10), ("num_val", -1), ("max_length", 0),
                                         ("max_length", 2.5)])
def test_bad_settings_name_the_field(tmp_path, field, value):
  with pytest.raises(ConfigError, match=f"data.{field}"):
    load(tmp_path, **{field: value})


def test_random_mock_data_stays_in_vocab(tmp_path):
  # TFDS's own mock: random text (str) of 10-19 characters, labels as 0-d arrays.
  with tfds.testing.mock_data(num_examples=6):
    prepared = lra_text.load({"max_length": 12, "num_val": 2}, data_dir=str(tmp_path),
                             manual_dir=None)
    lengths = set()
    for split in ("train", "validation", "test"):
      for i in range(len(prepared.sources[split])):
        ex = prepared.sources[split][i]
        assert ex["tokens"].dtype == np.int32 and ex["label"] in (0, 1)
        assert 1 <= ex["tokens"].min() and ex["tokens"].max() < VOCAB_SIZE
        lengths.add(ex["tokens"].size)
  assert max(lengths) == 12 and min(lengths) >= 10


def test_unprepared_imdb_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    lra_text.load(SETTINGS, data_dir=str(tmp_path), manual_dir=None)
  message = str(info.value)
  assert f"tfds build imdb_reviews --data_dir {tmp_path} --file_format=array_record" in message
  assert not list(tmp_path.rglob("*.array_record*"))  # nothing was downloaded or written
