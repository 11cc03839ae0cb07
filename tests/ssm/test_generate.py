"""ssm.generate: cached decoding equals recomputing the full forward pass at every step, and the
sampling filters keep exactly the tokens their definitions allow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssm.generate import generate, sample_logits
from tests.ssm.test_model import LM_PATTERN, _lm


def test_greedy_generation_equals_full_recomputation():
  model = _lm(LM_PATTERN, 6)
  prompt = np.random.default_rng(0).integers(0, 11, (2, 6)).astype(np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), prompt)
  out = np.asarray(generate(model, params, jnp.asarray(prompt), jax.random.key(0),
                            max_new_tokens=7))
  assert out.shape == (2, 13) and (out[:, :6] == prompt).all()
  apply = jax.jit(model.apply)
  tokens = prompt
  for _ in range(7):
    logits = apply(params, tokens)[0]
    tokens = np.concatenate([tokens, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
  np.testing.assert_array_equal(out, tokens)


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
