"""End-to-end training on generated ListOps: learning, exact resume, the optimizer groups, NaN steps,
and the same step on 8 devices as on 1."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm import config as config_lib
from ssm import train as train_lib
from ssm.data import tasks
from tests.numerics import rel


ROOT = pathlib.Path(__file__).resolve().parents[2]


def _trainer(config):
  return train_lib.Trainer(config, tasks.load_task(config.data, seed=config.seed))


def test_loss_goes_down(tiny):
  """Training on the stream lowers the validation loss; repeating one batch drives its loss far down."""
  tiny.train.num_steps = 100  # the cosine schedule stays near its peak for these 40 steps
  tiny.optim.lr = 1e-2
  trainer = _trainer(tiny)
  data = trainer.task.train_iterator()
  state = trainer.init_state(next(trainer.task.train_iterator()))
  before = trainer.evaluate(state.params, "validation")["loss"]
  for _ in range(30):
    state, m = trainer.train_step(state, next(data))
    assert np.isfinite(float(m["loss"]))
  after = trainer.evaluate(state.params, "validation")["loss"]
  assert after < before - 0.03, (before, after)
  batch = next(data)
  losses = []
  for _ in range(30):
    state, m = trainer.train_step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_stopped_and_resumed_run_matches_uninterrupted(tiny, tmp_path):
  """Also: the resumed run keeps its checkpoints in train.checkpoint_dir (outside its workdir)
  and traces step 5 with the profiler, neither of which changes a number."""
  full = _trainer(tiny).run(tmp_path / "full", log=lambda *_: None)
  tiny.train.checkpoint_dir = str(tmp_path / "bucket" / "run")
  first = _trainer(tiny).run(tmp_path / "resumed", stop_at=4, log=lambda *_: None)
  assert first["step"] == 4 and "test" not in first
  assert (tmp_path / "bucket" / "run" / "4").is_dir()
  assert not (tmp_path / "resumed" / "checkpoints").exists()
  tiny.train.update(profile_start=4, profile_steps=1)
  resumed = _trainer(tiny).run(tmp_path / "resumed", log=lambda *_: None)
  traces = list((tmp_path / "resumed" / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
  assert resumed["step"] == full["step"] == tiny.train.num_steps
  assert int(resumed["state"].step) == int(full["state"].step) == 6
  for a, b in zip(jax.tree.leaves(resumed["state"].params), jax.tree.leaves(full["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(resumed["state"].opt_state), jax.tree.leaves(full["state"].opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["data_state"] == full["data_state"]
  task = tasks.load_task(tiny.data, seed=tiny.seed)
  it_full, it_resumed = task.train_iterator(), task.train_iterator()
  it_full.set_state(full["data_state"])
  it_resumed.set_state(resumed["data_state"])
  next_full, next_resumed = next(it_full), next(it_resumed)
  for key in next_full:
    np.testing.assert_array_equal(next_full[key], next_resumed[key])
  assert resumed["test"] == full["test"]
  # Metrics went to JSONL for both halves of the resumed run.
  steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert {2, 4, 6} <= set(steps)


def test_eval_counts_every_example_once(tiny):
  trainer = _trainer(tiny)
  state = trainer.init_state(next(trainer.task.train_iterator()))
  for split, size in (("validation", tiny.data.num_val), ("test", tiny.data.num_test)):
    m = trainer.evaluate(state.params, split)
    assert m["examples"] == size
    assert 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["loss"])


def test_optimizer_groups_learning_rates_and_decay(tiny):
  """First AdamW step with constant lr: update = -lr * (g / (|g| + eps) + wd * p) per group."""
  tiny.optim.update(schedule="constant", warmup_steps=0, grad_clip=0.0, lr=1e-2, ssm_lr=1e-4, weight_decay=0.5)
  trainer = _trainer(tiny)
  batch = next(trainer.task.train_iterator())
  state = trainer.init_state(batch)
  before = jax.device_get(state.params)
  def mean_loss(p):
    sums = train_lib.compute_sums(trainer.model, p, trainer.shard_batch(batch), jax.random.PRNGKey(0))
    return sums["loss_sum"] / sums["weight"]
  grads = jax.grad(mean_loss)(state.params)
  state, _ = trainer.train_step(state, batch)
  after = jax.device_get(state.params)
  labels = train_lib.param_groups(before, trainer.ssm_names)
  seen = set()
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    p0 = np.asarray(_get(before, path), np.float64)
    g = np.asarray(_get(grads, path), np.float64)
    lr, wd = {"ssm": (1e-4, 0.0), "decay": (1e-2, 0.5), "no_decay": (1e-2, 0.0)}[label]
    expected = p0 - lr * (g / (np.abs(g) + 1e-8) + wd * p0)
    assert rel(_get(after, path), expected) < 1e-4, (path, label)
    seen.add(label)
  assert seen == {"ssm", "decay", "no_decay"}
  leaf_names = {str(path[-1].key): label for path, label in jax.tree_util.tree_leaves_with_path(labels)}
  assert leaf_names["log_dt"] == "ssm" and leaf_names["kernel"] == "decay"


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_nonfinite_step_is_not_applied(tiny):
  trainer = _trainer(tiny)
  batch = next(trainer.task.train_iterator())
  state = trainer.init_state(batch)
  bad = jax.tree.map(lambda x: x, state.params)
  bad["out"]["bias"] = bad["out"]["bias"].at[0].set(jnp.nan)
  state = state.replace(params=bad)
  before = jax.device_get(state)
  new, m = trainer.train_step(state, batch)
  assert float(m["nonfinite"]) == 1.0 and int(new.skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(before.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, message", [
    (["--config.model.pattern=s4d,nope"], "config field 'model.pattern': unknown mixer 'nope'"),
    (["--config.data.seq_len=8"], "seq_len"),
])
def test_cli_reports_bad_config_and_data(tmp_path, bad, message):
  cmd = [sys.executable, "-m", "ssm", "train", "--config", "experiments/lra/listops.py:cpu",
         "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={tmp_path / 'tfds'}",
         "--config.data.num_train=50", "--config.data.num_val=20", "--config.data.num_test=20",
         "--config.data.max_length=40", "--config.data.max_depth=3", *bad]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-3000:]


def test_param_groups_by_submodule_name():
  # A Hyena filter is a submodule: every parameter under it joins the SSM group, whatever its leaf
  # name ("kernel" elsewhere is an ordinary weight).
  params = {"mixer": {"implicit_filter": {"dense_0": {"kernel": np.ones((3, 3)), "bias": np.ones(3)}},
                      "in_proj": {"kernel": np.ones((3, 3)), "bias": np.ones(3)},
                      "A_log": np.ones(3)}}
  labels = train_lib.param_groups(params, frozenset({"implicit_filter", "A_log"}))
  assert labels == {"mixer": {"implicit_filter": {"dense_0": {"kernel": "ssm", "bias": "ssm"}},
                              "in_proj": {"kernel": "decay", "bias": "no_decay"},
                              "A_log": "ssm"}}


def test_gradient_accumulation_equals_the_whole_batch(tiny):
  batch = next(_trainer(tiny).task.train_iterator())
  batch["weight"] = np.linspace(0.5, 1.5, len(batch["weight"])).astype(np.float32)  # unequal
  results = []
  for k in (1, 4):
    tiny.train.grad_accum = k
    trainer = _trainer(tiny)
    state = trainer.init_state(batch)
    state, m = trainer.train_step(state, batch)
    leaves = jax.tree.leaves(jax.device_get(state.params))
    results.append((float(m["loss"]), np.concatenate([np.ravel(a) for a in leaves])))
  assert abs(results[1][0] - results[0][0]) < 1e-6 * abs(results[0][0])
  assert rel(results[1][1], results[0][1]) < 1e-6


def _byte_lm(tmp_path, **data):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"{i}.txt").write_text(f"file {i}: " + "state space models " * 12)
  return config_lib.build(
      name="lm", model=dict(task="lm", d_model=16, n_layers=2, pattern="mamba",
                            mixers=dict(mamba=dict(d_state=4))),
      data=dict(name="text_folder", path=str(corpus), data_dir=str(tmp_path / "cache"),
                seq_len=16, batch_size=4, eval_batch_size=4, val_fraction=0.2,
                test_fraction=0.2, **data),
      optim=dict(warmup_steps=1), train=dict(num_steps=2, progress_bar=False))


def test_lm_loss_by_position_matches_a_float64_reference_and_the_mean_loss(tmp_path):
  config = _byte_lm(tmp_path)
  trainer = _trainer(config)
  state = trainer.init_state(next(iter(trainer.task.eval_batches("validation"))))
  params = jax.device_get(state.params)
  result = trainer.loss_by_position(params, "validation", 32, max_examples=3)
  windows = [trainer.task.source("validation", 32)[i]["tokens"] for i in range(3)]
  tokens = np.stack(windows)
  logits, _ = trainer.eval_model.apply({"params": params}, tokens, mask=np.ones_like(tokens, bool))
  logits = np.asarray(logits, np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]  # [3, 31]
  assert result["windows"] == 3 and len(result["per_position"]) == 31
  assert rel(np.asarray(result["per_position"]), nll.mean(0)) < 1e-5
  assert result["loss"] == pytest.approx(nll.mean(), rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(nll.mean() / np.log(2), rel=1e-5)
  # The whole split at the training length: the same mean as `evaluate`.
  full = trainer.loss_by_position(params, "validation", 16, max_examples=0)
  assert full["loss"] == pytest.approx(trainer.evaluate(params, "validation")["loss"], rel=1e-5)


def test_lm_targets_use_explicit_targets_and_drop_eval_filler():
  tokens = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]])
  mask = tokens > 0
  weight = jnp.array([1.0, 0.0])
  targets, weights = train_lib.lm_targets({"tokens": tokens, "mask": mask, "weight": weight})
  np.testing.assert_array_equal(targets[0], [6, 7, 0, 0])
  np.testing.assert_array_equal(weights, [[1, 1, 0, 0], [0, 0, 0, 0]])
  explicit = jnp.array([[-100, 3, -100, -100], [4, -100, -100, -100]])
  targets, weights = train_lib.lm_targets({"tokens": tokens, "mask": mask, "targets": explicit,
                                           "weight": jnp.ones(2)})
  np.testing.assert_array_equal(weights, [[0, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(targets, [[0, 3, 0, 0], [4, 0, 0, 0]])


@pytest.mark.parametrize("model, field", [
    (dict(task="classify"), "model.task"),
    (dict(input="continuous"), "model.input"),
])
def test_model_that_does_not_fit_the_task_is_named(tmp_path, model, field):
  config = _byte_lm(tmp_path)
  config_lib.merge(config, dict(model=model))
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    _trainer(config)
