"""Grain pipelines: padding, masks, epochs, shuffling, exact resume, process sharding, eval."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.data import pipeline
from ssm.data.lra_listops import LraListops, LraListopsConfig

tfds.disable_progress_bar()


def make_source(n, *, seed=0, max_len=9, long_at=None, long_len=0):
  """Examples with distinct random token rows (first token = 1 + index) and random labels."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = long_len if i == long_at else int(rng.integers(1, max_len + 1))
    tokens = rng.integers(1, 16, size=length).astype(np.int32)
    tokens[0] = 1000 + i  # makes every example identifiable from its first token
    out.append({"tokens": tokens, "label": int(rng.integers(0, 10))})
  return out


def identify(batch):
  return [int(t) - 1000 for t in batch["tokens"][:, 0]]


def check_rows(batch, source, seq_len):
  """Every row is its source example padded with zeros, mask True exactly on its tokens."""
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape[1] == seq_len
  assert batch["mask"].dtype == np.bool_ and batch["mask"].shape == batch["tokens"].shape
  assert batch["label"].dtype == np.int32 and batch["weight"].dtype == np.float32
  for row, i in enumerate(identify(batch)):
    ref = source[i]["tokens"]
    n = ref.size
    np.testing.assert_array_equal(batch["tokens"][row, :n], ref)
    assert not batch["tokens"][row, n:].any()
    np.testing.assert_array_equal(batch["mask"][row], np.arange(seq_len) < n)
    assert batch["label"][row] == source[i]["label"]


def take(it, k):
  return [next(it) for _ in range(k)]


def test_train_batches_are_padded_and_every_epoch_is_a_new_permutation():
  source = make_source(12)
  it = pipeline.train_iterator(source, batch_size=4, seq_len=10, seed=5, process_index=0,
                               process_count=1)
  batches = take(it, 9)
  for b in batches:
    check_rows(b, source, 10)
    np.testing.assert_array_equal(b["weight"], np.ones(4, np.float32))
  epochs = [sum((identify(b) for b in batches[3 * e:3 * e + 3]), []) for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(12))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  # Seeded: the same seed repeats the stream, another seed does not.
  again = pipeline.train_iterator(source, batch_size=4, seq_len=10, seed=5, process_index=0,
                                  process_count=1)
  assert sum((identify(b) for b in take(again, 3)), []) == epochs[0]
  other = pipeline.train_iterator(source, batch_size=4, seq_len=10, seed=6, process_index=0,
                                  process_count=1)
  assert sum((identify(b) for b in take(other, 3)), []) != epochs[0]


@pytest.mark.parametrize("consumed", [0, 2, 5])
def test_resume_from_state_gives_the_same_next_batches(consumed):
  source = make_source(10, seed=1)
  kwargs = dict(batch_size=3, seq_len=9, seed=11, process_index=0, process_count=1)
  it = pipeline.train_iterator(source, **kwargs)
  take(it, consumed)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = take(it, 6)  # crosses at least one epoch boundary (10 examples, 3 per batch)
  resumed = pipeline.train_iterator(source, **kwargs)
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 6)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_restoring_a_state_from_other_settings_fails():
  source = make_source(10)
  it = pipeline.train_iterator(source, batch_size=2, seq_len=9, seed=0, process_index=0,
                               process_count=1)
  next(it)
  state = it.get_state()
  other = pipeline.train_iterator(source, batch_size=2, seq_len=9, seed=1, process_index=0,
                                  process_count=1)
  with pytest.raises(ValueError, match="seed: saved 0, now 1"):
    other.set_state(state)


def test_process_shards_are_disjoint_and_complete():
  source = make_source(11)
  count = 3
  train_seen, eval_seen, eval_lengths = [], [], set()
  for p in range(count):
    shard_size = len(range(p, 11, count))
    it = pipeline.train_iterator(source, batch_size=1, seq_len=9, seed=2, process_index=p,
                                 process_count=count)
    first_epoch = sum((identify(b) for b in take(it, shard_size)), [])
    assert len(set(first_epoch)) == shard_size
    # The next epoch of this process draws from the same shard.
    assert set(sum((identify(b) for b in take(it, shard_size)), [])) == set(first_epoch)
    train_seen += first_epoch
    batches = pipeline.eval_batches(source, batch_size=2, seq_len=9, process_index=p,
                                    process_count=count)
    eval_lengths.add(len(batches))
    for b in batches:
      eval_seen += [i for i, w in zip(identify(b), b["weight"]) if w == 1.0]
  assert sorted(train_seen) == list(range(11))
  assert sorted(eval_seen) == list(range(11))
  assert eval_lengths == {2}  # ceil(ceil(11 / 3) / 2): every process steps the same number


def test_eval_covers_every_example_once_in_order_with_filler_weighted_zero():
  source = make_source(11, seed=3)
  batches = pipeline.eval_batches(source, batch_size=4, seq_len=9, process_index=0,
                                  process_count=1)
  assert len(batches) == 3 and batches.num_examples == 11
  seen, weights = [], []
  for b in batches:
    check_rows(b, source, 9)
    seen += identify(b)
    weights += b["weight"].tolist()
  assert seen[:11] == list(range(11)) and weights[:11] == [1.0] * 11
  assert weights[11:] == [0.0]
  # The filler is a real example (non-empty mask), so masked pooling stays finite.
  assert seen[11] in range(11)
  # A second pass gives the same batches.
  assert sum((identify(b) for b in batches), []) == seen


def test_too_long_example_raises_with_index_length_and_seq_len():
  source = make_source(6, long_at=4, long_len=15)
  it = pipeline.train_iterator(source, batch_size=6, seq_len=10, seed=0, process_index=0,
                               process_count=1)
  with pytest.raises(pipeline.ExampleTooLongError, match="example 4 has 15 tokens.*seq_len=10"):
    next(it)
  with pytest.raises(pipeline.ExampleTooLongError, match="example 4 has 15 tokens"):
    list(pipeline.eval_batches(source, batch_size=6, seq_len=10, process_index=0,
                               process_count=1))


def test_truncate_keeps_the_first_seq_len_tokens():
  source = make_source(6, long_at=4, long_len=15)
  batch = next(iter(pipeline.eval_batches(source, batch_size=6, seq_len=10, process_index=0,
                                          process_count=1, truncate=True)))
  np.testing.assert_array_equal(batch["tokens"][4], source[4]["tokens"][:10])
  assert batch["mask"][4].all()


def test_pipeline_over_a_tfds_source(tmp_path):
  config = LraListopsConfig.generated(num_train=13, num_val=7, num_test=3, min_length=5,
                                      max_length=30, max_depth=3, max_args=4, seed=0)
  builder = LraListops(config=config, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  val = builder.as_data_source("validation")
  rows = collections.Counter()
  for b in pipeline.eval_batches(val, batch_size=4, seq_len=30, process_index=0,
                                 process_count=1):
    for tokens, mask, label, weight in zip(b["tokens"], b["mask"], b["label"], b["weight"]):
      if weight:
        rows[(tuple(tokens[mask].tolist()), int(label))] += 1
  assert rows == collections.Counter(
      (tuple(np.asarray(val[i]["tokens"]).tolist()), int(val[i]["label"]))
      for i in range(len(val)))
  train = pipeline.train_iterator(builder.as_data_source("train"), batch_size=5, seq_len=30,
                                  seed=0, process_index=0, process_count=1)
  b = next(train)
  assert b["tokens"].shape == (5, 30) and b["mask"].sum(1).min() > 5


def test_bad_arguments_are_named():
  source = make_source(4)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.train_iterator(source, batch_size=0, seq_len=9, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.eval_batches(source, batch_size=2, seq_len=9, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="process 3 of 4 gets no training example"):
    pipeline.train_iterator(make_source(3), batch_size=1, seq_len=9, seed=0, process_index=3,
                            process_count=4)


def test_pairs_targets_and_features_are_padded_each_in_their_way():
  rng = np.random.default_rng(0)
  pair = {"tokens": rng.integers(1, 9, 3), "tokens2": rng.integers(1, 9, 5), "label": 1}
  out = pipeline.pad_example(pair, index=0, seq_len=6)
  assert out["tokens"].shape == (6, 2) and out["mask"].shape == (6, 2)
  np.testing.assert_array_equal(out["tokens"][:, 0], np.r_[pair["tokens"], 0, 0, 0])
  np.testing.assert_array_equal(out["tokens"][:, 1], np.r_[pair["tokens2"], 0])
  np.testing.assert_array_equal(out["mask"].sum(0), [3, 5])
  lm = {"tokens": rng.integers(1, 9, 4), "targets": np.array([-100, 3, -100, 7])}
  out = pipeline.pad_example(lm, index=0, seq_len=6)
  np.testing.assert_array_equal(out["targets"], [-100, 3, -100, 7, -100, -100])
  assert "label" not in out
  features = {"tokens": rng.normal(size=(4, 3)), "label": 0}
  out = pipeline.pad_example(features, index=0, seq_len=6)
  assert out["tokens"].dtype == np.float32 and out["tokens"].shape == (6, 3)
  np.testing.assert_allclose(out["tokens"][:4], features["tokens"], rtol=1e-6)
  np.testing.assert_array_equal(out["tokens"][4:], 0)
  with pytest.raises(pipeline.ExampleTooLongError, match="example 7 has 5 tokens"):
    pipeline.pad_example(pair, index=7, seq_len=4)


def test_stream_windows_and_first():
  stream = pipeline.TokenStream(np.arange(1, 24, dtype=np.uint16))
  windows = pipeline.StreamWindows(stream, 5)
  assert len(windows) == 4  # 23 tokens: the partial fifth window is dropped
  np.testing.assert_array_equal(windows[3]["tokens"], np.arange(16, 21))
  assert windows[3]["tokens"].dtype == np.int32
  with pytest.raises(IndexError):
    windows[4]
  head = pipeline.first(windows, 2)
  assert len(head) == 2 and head[1]["tokens"][0] == 6
  assert len(pipeline.first(windows, 10)) == 4
