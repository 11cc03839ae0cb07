"""ssm.presets and `python -m ssm info`: every preset validates at every size, lands near its
nominal parameter count (counted from shapes, nothing allocated), and the info table lists its
blocks; the tiny sizes run forward and decode."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ssm import config as config_lib
from ssm import info, presets
from ssm import model as model_lib
from tests.numerics import rel

NOMINAL = {"125m": 125e6, "350m": 350e6, "1.3b": 1.3e9}


def _config(name, size):
  config = config_lib.build(model=presets.model_preset(name, size))
  config_lib.validate(config)
  return config


@pytest.mark.parametrize("name", presets.PRESETS)
def test_presets_land_near_their_nominal_sizes(name):
  for size, nominal in NOMINAL.items():
    config = _config(name, size)
    count = info.parameter_count(config, num_outputs=presets.VOCAB, vocab_size=presets.VOCAB)
    assert 0.85 * nominal < count < 1.2 * nominal, (name, size, count)


def test_info_table_lists_every_block():
  config = _config("griffin", "125m")
  text = info.describe(config, num_outputs=presets.VOCAB, vocab_size=presets.VOCAB)
  lines = text.splitlines()
  assert "12 blocks = 4 x pattern 'rec,rec,local'" in lines[0]
  assert [line.split()[:2] for line in lines[3:6]] == [["rec", "mamba2"], ["rec", "mamba2"],
                                                      ["local", "attention"]]
  total = info.parameter_count(config, num_outputs=presets.VOCAB, vocab_size=presets.VOCAB)
  assert f"total parameters {total:,}" in text


@pytest.mark.parametrize("name", presets.PRESETS)
def test_tiny_presets_run_and_stream(name):
  config = _config(name, "tiny")
  model = model_lib.build_model(config.model, num_outputs=256, vocab_size=256)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  full = jax.jit(model.apply)(params, tokens)[0]
  step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
  cache = model.init_cache(2)
  first, cache = step(params, tokens[:, :20], cache)
  rest, cache = step(params, tokens[:, 20:], cache)
  assert rel(np.concatenate([first, rest], axis=1), full) < 1e-5
