"""Synthetic recall generators (MQAR, selective copying, induction heads), checked against
hand-built cases and against the target functions, which read the answer from the tokens alone."""

from __future__ import annotations

import numpy as np
import pytest

from ssm.data import recall

IGNORE = recall.IGNORE_INDEX


def check_common(data: dict[str, np.ndarray], num_examples: int, length: int,
                 vocab_size: int) -> None:
  for key in ("tokens", "targets", "target_mask"):
    assert data[key].shape == (num_examples, length), key
  assert data["tokens"].dtype == np.int32 and data["targets"].dtype == np.int32
  assert data["target_mask"].dtype == np.bool_
  assert data["tokens"].min() >= 1 and data["tokens"].max() < vocab_size
  np.testing.assert_array_equal(data["target_mask"], data["targets"] != IGNORE)
  masked = data["targets"][data["target_mask"]]
  assert masked.min() >= 1 and masked.max() < vocab_size


# ---------------------------------------------------------------------------------------- MQAR


def test_mqar_targets_on_a_hand_built_example():
  # Context: (5 -> 4100), (7 -> 4200); queries for 7 at position 5 and 5 at position 8.
  tokens = [5, 4100, 7, 4200, 9, 7, 3, 11, 5, 4100]
  expected = [IGNORE] * 10
  expected[5], expected[8] = 4200, 4100
  np.testing.assert_array_equal(recall.mqar_targets(tokens, num_pairs=2), expected)


@pytest.mark.parametrize("length,num_pairs", recall.MQAR_SETTINGS)
def test_mqar_issue_settings(length, num_pairs):
  n, vocab = 16, recall.MQAR_VOCAB_SIZE
  data = recall.generate_mqar(n, length=length, num_pairs=num_pairs, seed=3)
  check_common(data, n, length, vocab)
  tokens, targets = data["tokens"], data["targets"]
  half = vocab // 2
  for i in range(n):
    keys, values = tokens[i, 0:2 * num_pairs:2], tokens[i, 1:2 * num_pairs:2]
    assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs
    assert keys.min() >= 1 and keys.max() < half and values.min() >= half
    # Every key is queried exactly once, at an even offset after the context, and the target
    # there is its value.
    pos = np.flatnonzero(data["target_mask"][i])
    assert len(pos) == num_pairs and np.all((pos - 2 * num_pairs) % 2 == 0)
    assert pos.min() >= 2 * num_pairs
    assert sorted(tokens[i, pos]) == sorted(keys)
    lookup = dict(zip(keys, values))
    assert all(targets[i, t] == lookup[tokens[i, t]] for t in pos)
    np.testing.assert_array_equal(targets[i], recall.mqar_targets(tokens[i], num_pairs))


def test_mqar_gaps_follow_the_power_law():
  # One query per example: the slot distribution is p(s) ~ (s + 1)^(a - 1) exactly.
  n, length = 4000, 64
  data = recall.generate_mqar(n, length=length, num_pairs=1, seed=0)
  slots = (np.flatnonzero(data["target_mask"].reshape(-1)) % length - 2) // 2
  num_slots = recall.mqar_query_slots(length, 1)
  freq = np.bincount(slots, minlength=num_slots) / n
  p = recall.mqar_gap_probs(num_slots, 0.01)
  assert np.all(np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / n) + 1e-3), (freq, p)
  # An issue setting (4 queries, drawn without replacement): small gaps far more frequent.
  data = recall.generate_mqar(2000, length=64, num_pairs=4, seed=1)
  slots = (np.nonzero(data["target_mask"])[1] - 8) // 2
  counts = np.bincount(slots, minlength=28)
  assert counts[0] > 10 * counts[-1], counts
  assert counts[:7].sum() > 4 * counts[-7:].sum(), counts
  # power_a = 1 is uniform.
  data = recall.generate_mqar(2000, length=64, num_pairs=4, power_a=1.0, seed=1)
  counts = np.bincount((np.nonzero(data["target_mask"])[1] - 8) // 2, minlength=28)
  assert counts.max() < 1.6 * counts.min(), counts


def test_mqar_noise_never_repeats_a_key():
  # A tiny vocabulary makes noise collide with keys often unless it is redrawn.
  data = recall.generate_mqar(200, length=64, num_pairs=4, vocab_size=12, seed=0)
  check_common(data, 200, 64, 12)
  for i in range(200):
    keys = set(data["tokens"][i, 0:8:2])
    after = data["tokens"][i, 8:]
    assert sum(t in keys for t in after) == 4


# ------------------------------------------------------------------------- selective copying


def test_selective_copying_targets_on_a_hand_built_example():
  n, m, d = recall.NOISE_ID, recall.MARKER_ID, recall.DATA_OFFSET
  tokens = [n, d + 4, n, n, d + 1, d + 4, n, m, m, m]
  expected = [IGNORE] * 7 + [d + 4, d + 1, d + 4]
  np.testing.assert_array_equal(recall.selective_copying_targets(tokens), expected)


def test_selective_copying():
  n, length, num_tokens, vocab = 50, 64, 8, 10
  data = recall.generate_selective_copying(n, length=length, num_tokens=num_tokens,
                                           vocab_size=vocab, seed=2)
  check_common(data, n, length, vocab)
  tokens = data["tokens"]
  assert np.all(tokens[:, -num_tokens:] == recall.MARKER_ID)
  body = tokens[:, :-num_tokens]
  assert np.all(np.isin(body, [recall.NOISE_ID] + list(range(recall.DATA_OFFSET, vocab))))
  assert np.all((body >= recall.DATA_OFFSET).sum(1) == num_tokens)
  assert np.all(data["target_mask"].sum(1) == num_tokens)
  for i in range(n):
    np.testing.assert_array_equal(data["targets"][i], recall.selective_copying_targets(tokens[i]))
  # Data positions are scattered, not a fixed prefix.
  assert len({tuple(np.flatnonzero(row >= recall.DATA_OFFSET)) for row in body}) > 40


# ---------------------------------------------------------------------------- induction heads


def test_induction_head_targets_on_a_hand_built_example():
  t = recall.TRIGGER_ID
  tokens = [5, 7, t, 9, 4, 6, t]
  np.testing.assert_array_equal(recall.induction_head_targets(tokens),
                                [IGNORE] * 6 + [9])


def test_induction_head():
  n, length, vocab = 100, 32, 8
  data = recall.generate_induction_head(n, length=length, vocab_size=vocab, seed=4)
  check_common(data, n, length, vocab)
  tokens = data["tokens"]
  assert np.all((tokens == recall.TRIGGER_ID).sum(1) == 2)
  assert np.all(tokens[:, -1] == recall.TRIGGER_ID)
  assert data["label"].shape == (n,) and data["label"].dtype == np.int32
  np.testing.assert_array_equal(data["label"], data["targets"][:, -1])
  for i in range(n):
    np.testing.assert_array_equal(data["targets"][i], recall.induction_head_targets(tokens[i]))
  # The first trigger moves around and may sit right before the second.
  first = np.argmax(tokens == recall.TRIGGER_ID, axis=1)
  assert len(set(first)) > 15 and first.max() == length - 3


# --------------------------------------------------------------------------- all generators

GENERATORS = {
    "mqar": (recall.generate_mqar, dict(length=64, num_pairs=4)),
    "selective_copying": (recall.generate_selective_copying, dict(length=64, num_tokens=8)),
    "induction_head": (recall.generate_induction_head, dict(length=32)),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_determinism(name):
  fn, kwargs = GENERATORS[name]
  a, b, c = (fn(20, seed=s, **kwargs) for s in (7, 7, 8))
  assert a.keys() == b.keys() == c.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["tokens"], c["tokens"])
  empty = fn(0, seed=0, **kwargs)
  assert empty["tokens"].shape == (0, kwargs["length"])


@pytest.mark.parametrize("fn,kwargs,field", [
    (recall.generate_mqar, dict(length=15, num_pairs=4), "length"),
    (recall.generate_mqar, dict(num_pairs=0), "num_pairs"),
    (recall.generate_mqar, dict(num_pairs=5, vocab_size=10, length=64), "num_pairs"),
    (recall.generate_mqar, dict(vocab_size=2), "vocab_size"),
    (recall.generate_mqar, dict(power_a=0.0), "power_a"),
    (recall.generate_mqar, dict(length=64.0), "length"),
    (recall.generate_selective_copying, dict(length=15, num_tokens=8), "length"),
    (recall.generate_selective_copying, dict(num_tokens=0), "num_tokens"),
    (recall.generate_selective_copying, dict(vocab_size=3), "vocab_size"),
    (recall.generate_induction_head, dict(length=2), "length"),
    (recall.generate_induction_head, dict(vocab_size=2), "vocab_size"),
    (recall.generate_induction_head, dict(), "num_examples"),
])
def test_errors_name_the_field(fn, kwargs, field):
  num_examples = -1 if field == "num_examples" else 1
  with pytest.raises(ValueError, match=field):
    fn(num_examples, **kwargs)
