"""The recall tasks (`ssm.data.recall_tasks`): settings, seeds, splits and targets."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from ssm.config import ConfigError
from ssm.data import recall, recall_tasks
from ssm.data.prepared import SPLITS

SMALL = {
    "mqar": dict(length=32, num_pairs=4, vocab=64, power_a=0.01, num_train=40, num_val=10,
                 num_test=12, gen_seed=3),
    "selective_copying": dict(length=48, num_tokens=5, vocab=9, num_train=30, num_val=7,
                              num_test=8, gen_seed=3),
    "induction_heads": dict(length=40, vocab=12, num_train=30, num_val=7, num_test=8,
                            gen_seed=3),
}


def load(task, **overrides):
  settings = {**SMALL[task], **overrides}
  return recall_tasks.TASK_SPECS[task].load(settings, data_dir=None, manual_dir=None)


def stacked(prepared, split, key="tokens"):
  src = prepared.sources[split]
  return np.stack([src[i][key] for i in range(len(src))])


def test_fields_are_the_settings_of_the_generators():
  specs = recall_tasks.TASK_SPECS
  assert set(specs) == {"mqar", "selective_copying", "induction_heads"}
  for task, spec in specs.items():
    assert spec.kind == "lm"
    assert set(spec.fields) == set(SMALL[task]), task
  mqar = specs["mqar"].fields
  assert (mqar["length"], mqar["num_pairs"], mqar["vocab"]) == (64, 4, recall.MQAR_VOCAB_SIZE)
  assert (mqar["num_train"], mqar["num_val"], mqar["num_test"]) == (100_000, 1_000, 1_000)
  for task, generate in (("mqar", recall.generate_mqar),
                         ("selective_copying", recall.generate_selective_copying),
                         ("induction_heads", recall.generate_induction_head)):
    params = inspect.signature(generate).parameters
    for field, arg in {"mqar": recall_tasks.MQAR_ARGS,
                       "selective_copying": recall_tasks.SELECTIVE_COPYING_ARGS,
                       "induction_heads": recall_tasks.INDUCTION_HEADS_ARGS}[task].items():
      assert specs[task].fields[field] == params[arg].default, (task, field)


@pytest.mark.parametrize("task", sorted(SMALL))
def test_prepared_shapes_vocab_and_sizes(task):
  prepared = load(task)
  s = SMALL[task]
  assert prepared.kind == "lm" and prepared.vocab_size == s["vocab"]
  assert prepared.num_classes == 0 and prepared.d_input == 0
  assert prepared.max_num_tokens == {split: s["length"] for split in SPLITS}
  sizes = {"train": s["num_train"], "validation": s["num_val"], "test": s["num_test"]}
  for split, n in sizes.items():
    src = prepared.sources[split]
    assert len(src) == n
    example = src[n - 1]
    assert set(example) == {"tokens", "targets"}
    assert example["tokens"].shape == example["targets"].shape == (s["length"],)
    assert example["tokens"].dtype == example["targets"].dtype == np.int32
    tokens, targets = stacked(prepared, split), stacked(prepared, split, "targets")
    assert tokens.min() >= 1 and tokens.max() < s["vocab"]
    real = targets[targets != recall.IGNORE_INDEX]
    assert real.size and real.min() >= 1 and real.max() < s["vocab"]


@pytest.mark.parametrize("task", sorted(SMALL))
def test_same_settings_same_data_and_gen_seed_changes_it(task):
  a, b, c = load(task), load(task), load(task, gen_seed=4)
  for split in SPLITS:
    for key in ("tokens", "targets"):
      np.testing.assert_array_equal(stacked(a, split, key), stacked(b, split, key))
    assert not np.array_equal(stacked(a, split), stacked(c, split))


@pytest.mark.parametrize("task", sorted(SMALL))
def test_splits_are_different_draws(task):
  prepared = load(task, num_train=10, num_val=10, num_test=10)
  rows = {split: {stacked(prepared, split)[i].tobytes() for i in range(10)} for split in SPLITS}
  assert not rows["train"] & rows["validation"]
  assert not rows["train"] & rows["test"]
  assert not rows["validation"] & rows["test"]


def test_split_seeds_are_derived_from_gen_seed_and_split():
  seeds = {(g, s): recall_tasks.split_seed(g, s) for g in (0, 1, 2) for s in SPLITS}
  assert len(set(seeds.values())) == len(seeds)
  assert recall_tasks.split_seed(5, "test") == recall_tasks.split_seed(5, "test")
  # The validation split is exactly the generator's output under the documented seed.
  prepared = load("mqar")
  s = SMALL["mqar"]
  ref = recall.generate_mqar(s["num_val"], length=s["length"], num_pairs=s["num_pairs"],
                             vocab_size=s["vocab"], power_a=s["power_a"],
                             seed=recall_tasks.split_seed(s["gen_seed"], "validation"))
  np.testing.assert_array_equal(stacked(prepared, "validation"), ref["tokens"])
  np.testing.assert_array_equal(stacked(prepared, "validation", "targets"), ref["targets"])


def test_loaded_targets_match_the_tokens():
  mqar = load("mqar")
  for split in SPLITS:
    for i in (0, 5):
      ex = mqar.sources[split][i]
      np.testing.assert_array_equal(ex["targets"], recall.mqar_targets(ex["tokens"], 4))
      assert (ex["targets"] != recall.IGNORE_INDEX).sum() == 4
  copying = load("selective_copying")
  induction = load("induction_heads")
  for split in SPLITS:
    ex = copying.sources[split][3]
    np.testing.assert_array_equal(ex["targets"], recall.selective_copying_targets(ex["tokens"]))
    ex = induction.sources[split][3]
    np.testing.assert_array_equal(ex["targets"], recall.induction_head_targets(ex["tokens"]))


def test_mqar_example_by_hand():
  # The first example of train, read as a context of key-value pairs followed by queries.
  ex = load("mqar").sources["train"][0]
  tokens, targets = ex["tokens"], ex["targets"]
  pairs = dict(zip(tokens[0:8:2].tolist(), tokens[1:8:2].tolist()))
  assert all(k < 32 <= v for k, v in pairs.items())  # keys 1..31, values 32..63 for vocab 64
  queried = {int(tokens[t]): int(targets[t]) for t in np.flatnonzero(targets >= 0)}
  assert queried == pairs


@pytest.mark.parametrize("task, overrides, field", [
    ("mqar", dict(vocab=3), "data.vocab"),
    ("mqar", dict(vocab=8, num_pairs=4), "data.num_pairs"),  # only 3 distinct keys
    ("mqar", dict(length=15), "data.length"),
    ("mqar", dict(length=64.0), "data.length"),
    ("mqar", dict(power_a=0.0), "data.power_a"),
    ("mqar", dict(power_a="0.01"), "data.power_a"),
    ("mqar", dict(num_train=0), "data.num_train"),
    ("mqar", dict(num_val=-1), "data.num_val"),
    ("mqar", dict(num_test=True), "data.num_test"),
    ("mqar", dict(gen_seed=-1), "data.gen_seed"),
    ("selective_copying", dict(vocab=3), "data.vocab"),
    ("selective_copying", dict(num_tokens=0), "data.num_tokens"),
    ("selective_copying", dict(length=9), "data.length"),
    ("induction_heads", dict(vocab=2), "data.vocab"),
    ("induction_heads", dict(length=2), "data.length"),
    ("induction_heads", dict(num_val=0), "data.num_val"),
])
def test_bad_settings_name_the_field(task, overrides, field):
  with pytest.raises(ConfigError) as info:
    load(task, **overrides)
  assert info.value.field == field
  assert "vocab_size" not in str(info.value)  # the generator's argument name is translated
