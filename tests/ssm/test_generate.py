"""ssm.generate: cached decoding equals recomputing the full forward pass at every step, and the
sampling filters keep exactly the tokens their definitions allow."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ssm import config as config_lib
from ssm import train as train_lib
from ssm.data import tasks
from ssm.generate import generate, sample_logits
from tests.ssm.test_model import LM_PATTERN, _lm

ROOT = pathlib.Path(__file__).resolve().parents[2]


def assert_greedy_recomputation(apply, params, tokens, *, prompt_length):
  """tokens [batch, L] (a prompt of prompt_length, then generated tokens) are what recomputing the
  full forward pass at every step and taking the argmax gives.

  One forward pass over all of `tokens` gives every step's logits at once (one compile instead of
  one per prefix length): an LM's logits at position t depend only on tokens[:, :t + 1], so they
  are the last-position logits of the forward pass over that prefix. That causality is checked
  here on the same input, with the same compiled function: replacing every token after t leaves
  the logits at t unchanged."""
  logits = np.asarray(apply(params, tokens)[0])
  length = tokens.shape[1]
  rng = np.random.default_rng(0)
  for t in range(prompt_length - 1, length - 1):
    future = tokens.copy()
    future[:, t + 1:] = (tokens[:, t + 1:] + rng.integers(1, logits.shape[-1], (
        tokens.shape[0], length - t - 1))) % logits.shape[-1]
    np.testing.assert_allclose(np.asarray(apply(params, future)[0])[:, t], logits[:, t],
                               rtol=1e-5, atol=1e-5 * np.abs(logits[:, t]).max())
  np.testing.assert_array_equal(tokens[:, prompt_length:],
                                np.argmax(logits[:, prompt_length - 1:-1], -1))


def test_greedy_generation_equals_full_recomputation():
  model = _lm(LM_PATTERN, 7)
  prompt = np.random.default_rng(0).integers(0, 11, (2, 6)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), prompt)
  out = np.asarray(generate(model, params, jnp.asarray(prompt), jax.random.key(0),
                            max_new_tokens=7))
  assert out.shape == (2, 13) and (out[:, :6] == prompt).all()
  assert_greedy_recomputation(jax.jit(model.apply), params, out, prompt_length=6)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.key(1)
  top2 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2))
  assert set(top2.tolist()) == {0, 1}
  assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.04
  # top_p = 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: tokens 0 and 1 stay.
  nucleus = np.asarray(sample_logits(logits, keys, temperature=1.0, top_p=0.7))
  assert set(nucleus.tolist()) == {0, 1}
  everything = np.asarray(sample_logits(logits, keys, temperature=1.0))
  assert set(everything.tolist()) == {0, 1, 2, 3}
  np.testing.assert_array_equal(sample_logits(logits[:3], keys), [0, 0, 0])


def test_cli_generate_from_the_initial_parameters(tmp_path):
  overrides = [f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.num_train=50",
               "--config.data.num_val=20", "--config.data.num_test=20",
               "--config.data.min_length=5", "--config.data.max_length=40",
               "--config.data.max_depth=3"]
  base = [sys.executable, "-m", "ssm", "generate",
          "--config", "experiments/lm/preset.py:samba-tiny", "--workdir", str(tmp_path / "run"),
          "--prompt-tokens", "5,6,7", "--max-new-tokens", "4"]
  proc = subprocess.run(base + overrides, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 1 and "no checkpoint" in proc.stderr
  proc = subprocess.run(base + overrides + ["--random-init"], capture_output=True, text=True,
                        cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # The same initial parameters in this process, decoded by recomputing the forward pass.
  config = config_lib.apply_overrides(config_lib.load_config_file(
      "experiments/lm/preset.py:samba-tiny"), [o[len("--config."):] for o in overrides])
  trainer = train_lib.Trainer(config, tasks.load_task(config.data, seed=config.seed))
  tokens = np.asarray([[5, 6, 7]], np.int32)
  params = trainer.init_state({"tokens": tokens, "mask": np.ones((1, 3), bool)}).params
  assert out["prompt"] == [5, 6, 7] and len(out["generated"]) == 4
  assert_greedy_recomputation(jax.jit(trainer.eval_model.apply), {"params": params},
                              np.asarray([out["prompt"] + out["generated"]], np.int32),
                              prompt_length=3)
