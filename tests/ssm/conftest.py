"""Shared fixtures for the composition/training tests: a tiny generated ListOps config."""

from __future__ import annotations

import pytest

from ssm import config as config_lib


def tiny_config(data_dir: str, **train) -> config_lib.ml_collections.ConfigDict:
  """A ListOps config small enough for a test: 2 S4D layers, short generated expressions."""
  return config_lib.build(
      name="tiny",
      model=dict(d_model=16, n_layers=2, pattern="s4d", prenorm=True,
                 mixers=dict(s4d=dict(d_state=8, bidirectional=True))),
      data=dict(data_dir=data_dir, seq_len=48, batch_size=8, eval_batch_size=16, num_train=160, num_val=40,
                num_test=40, min_length=5, max_length=48, max_depth=3, max_args=4, gen_seed=1),
      optim=dict(lr=3e-3, ssm_lr=1e-3, warmup_steps=2, weight_decay=0.01),
      train=dict(num_steps=6, log_every=2, eval_every=0, checkpoint_every=2, progress_bar=False, **train),
  )


@pytest.fixture
def tiny(tmp_path):
  return tiny_config(str(tmp_path / "tfds"))
