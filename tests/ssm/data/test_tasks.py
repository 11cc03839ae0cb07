"""`load_task`: config validation naming the field, and the Task it returns."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm.config import ConfigError
from ssm.data import listops, tasks

tfds.disable_progress_bar()


def data_config(data_dir, **overrides):
  cfg = dict(name="lra_listops", data_dir=str(data_dir), manual_dir=None, seq_len=40,
             batch_size=4, eval_batch_size=8, num_train=24, num_val=10, num_test=9,
             min_length=5, max_length=40, max_depth=3, max_args=4, gen_seed=1, truncate=False)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_load_task_generates_and_serves_batches(tmp_path):
  task = tasks.load_task(data_config(tmp_path), seed=3)
  assert (task.vocab_size, task.num_classes, task.seq_len) == (16, 10, 40)
  assert task.split_sizes == {"train": 24, "validation": 10, "test": 9}
  batch = next(task.train_iterator())
  assert batch["tokens"].shape == (4, 40) and batch["mask"].shape == (4, 40)
  for tokens, mask, label in zip(batch["tokens"], batch["mask"], batch["label"]):
    assert listops.evaluate_tokens(tokens[mask]) == label
  for split in ("validation", "test"):
    weights = sum(float(b["weight"].sum()) for b in task.eval_batches(split))
    assert weights == task.split_sizes[split]
    src = task.source(split)
    labels = [int(src[i]["label"]) for i in range(len(src))]
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(task.label_counts(split), counts)
    assert task.majority_rate(split) == counts.max() / len(labels)
  # A second load reuses the prepared data and shuffles by the run seed.
  again = tasks.load_task(data_config(tmp_path), seed=3)
  np.testing.assert_array_equal(next(again.train_iterator())["tokens"], batch["tokens"])
  with pytest.raises(ValueError, match="unknown split 'val'"):
    task.eval_batches("val")


def test_load_task_reads_release_files(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for fname in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
    (manual / fname).write_text("Source\tTarget\n( ( [MAX 2 ) 9 ] )\t9\n( ( [SM 3 ) 9 ] )\t2\n")
  task = tasks.load_task(data_config(tmp_path / "tfds", manual_dir=str(manual)), seed=0)
  assert task.split_sizes == {"train": 2, "validation": 2, "test": 2}
  labels = [int(b) for batch in task.eval_batches("test") for b, w in
            zip(batch["label"], batch["weight"]) if w]
  assert labels == [9, 2]


@pytest.mark.parametrize("overrides,field", [
    (dict(name="no_such_task"), "data.name"),
    (dict(name="lra_text"), "data.gen_seed"),  # a ListOps setting the text task does not have
    (dict(seq_len=0), "data.seq_len"),
    (dict(batch_size=2.5), "data.batch_size"),
    (dict(truncate="yes"), "data.truncate"),
    (dict(max_length=6), "data.max_length"),
    (dict(max_depth=1), "data.max_depth"),
    (dict(min_length=30), "data.min_length"),  # depth 3, 4 args: at most 26 tokens
    (dict(num_val=0), "data.num_val"),
])
def test_bad_fields_are_named(tmp_path, overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    tasks.load_task(data_config(tmp_path, **overrides), seed=0)


def test_unknown_task_lists_known_names(tmp_path):
  with pytest.raises(ConfigError, match="known: .*lra_listops.*lra_text.*mqar"):
    tasks.load_task(data_config(tmp_path, name="imdb"), seed=0)


def test_seq_len_shorter_than_the_data_is_caught_up_front(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.seq_len.*data\.truncate=True"):
    tasks.load_task(data_config(tmp_path, seq_len=8), seed=0)
  task = tasks.load_task(data_config(tmp_path, seq_len=8, truncate=True), seed=0)
  assert next(task.train_iterator())["mask"].shape == (4, 8)


def test_missing_release_file_names_the_path(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "basic_train.tsv").write_text("Source\tTarget\n( ( [MAX 2 ) 9 ] )\t9\n")
  with pytest.raises(FileNotFoundError, match=str(manual / "basic_val.tsv")):
    tasks.load_task(data_config(tmp_path / "tfds", manual_dir=str(manual)), seed=0)


def test_every_task_module_registers_and_fields_do_not_shadow_common_ones():
  specs = tasks.task_specs()
  assert {"lra_listops", "lra_pathfinder", "lra_image", "lra_text", "lra_retrieval", "mqar",
          "selective_copying", "induction_heads", "text_folder", "pg19", "lm1b", "fasta_dna",
          "npz_classification"} <= set(specs)
  for name, spec in specs.items():
    assert spec.kind in ("classify", "retrieval", "lm"), name
    assert not set(spec.fields) & set(tasks.COMMON_FIELDS), name
    assert tasks.task_fields(name)["name"] == name


def test_a_setting_of_another_task_is_named(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name="mqar", data_dir=str(tmp_path), seq_len=64,
                                       batch_size=4, eval_batch_size=4, max_depth=3))
  with pytest.raises(ConfigError, match=r"data\.max_depth.*task 'mqar' has no such setting"):
    tasks.load_task(cfg, seed=0)


def test_lm_task_with_targets_serves_padded_targets_and_eval_limits(tmp_path):
  cfg = ml_collections.ConfigDict(dict(
      name="mqar", data_dir=str(tmp_path), seq_len=80, batch_size=4, eval_batch_size=8,
      eval_examples=10, length=64, num_pairs=4, vocab=64, num_train=16, num_val=20, num_test=20))
  task = tasks.load_task(cfg, seed=0)
  assert (task.kind, task.vocab_size, task.num_classes) == ("lm", 64, 0)
  batch = next(task.train_iterator())
  assert batch["targets"].shape == (4, 80) and "label" not in batch
  np.testing.assert_array_equal(batch["targets"][:, 64:], -100)  # padding carries no target
  assert (batch["targets"][:, :64] >= 0).sum() == 4 * 4  # one target per query
  batches = list(task.eval_batches("validation"))
  assert sum(float(b["weight"].sum()) for b in batches) == 10  # data.eval_examples
  assert sum(float(b["weight"].sum()) for b in task.eval_batches("test", max_examples=0)) == 20


def test_stream_task_cuts_windows_of_any_length(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"{i}.txt").write_text(f"file {i} " * 40)
  cfg = ml_collections.ConfigDict(dict(name="text_folder", data_dir=str(tmp_path / "cache"),
                                       path=str(corpus), seq_len=16, batch_size=2,
                                       eval_batch_size=2, val_fraction=0.2, test_fraction=0.2))
  task = tasks.load_task(cfg, seed=0)
  assert task.is_stream and task.unit == "byte"
  stream = task.prepared.sources["validation"].tokens
  for length in (16, 48):
    windows = task.source("validation", length)
    assert len(windows) == len(stream) // length
    np.testing.assert_array_equal(windows[1]["tokens"], stream[length:2 * length])
  batch = next(iter(task.eval_batches("validation", seq_len=48)))
  assert batch["tokens"].shape == (2, 48) and batch["mask"].all()
