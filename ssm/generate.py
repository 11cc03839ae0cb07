"""Decoding an LM: prefill the prompt through the caches in one parallel chunk, then sample one
token at a time (greedy, temperature, top-k, top-p), all inside one jitted function.

Memory per generated token is constant for recurrent and sliding-window mixers: their caches have a
fixed size. Global attention keeps a buffer up to its configured maximum length; long convolutions
keep their last max_length inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssm.model import DTYPES

Array = jax.Array


def sample_logits(logits: Array, rng: Array, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """One token per row from logits [batch, vocab] -> [batch] int32.

  temperature 0: argmax. Otherwise softmax(logits / temperature) restricted to the top_k most
  likely tokens (0: all) and to the smallest set whose probability reaches top_p (1: all).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the probability of the tokens strictly before it is below top_p, so the
    # most likely token always stays.
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, params, prompt: Array, rng: Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Continues `prompt` [batch, P] (int tokens, every row of the same length P >= 1) by
  max_new_tokens sampled tokens; returns [batch, P + max_new_tokens].

  model: an LM `ssm.model.SequenceModel` (head "lm") whose mixers all stream; params its
  parameters ({"params": ...}). The prompt runs once through the caches (the mixers' chunked
  streaming form), then each new token is one cached step (one jitted function for both).
  """
  # The empty caches are an argument of the jitted function, not constants inside it: XLA:CPU
  # (jaxlib 0.10.2) can fuse a matmul against a constant zero state with a later RMSNorm into a
  # YNNPACK kernel that returns wrong rows (see layers/gated_delta.py, gated_delta_rule_chunked).
  cache = model.init_cache(prompt.shape[0], DTYPES[model.dtype])
  return _generate(model, params, prompt, rng, cache, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p"))
def _generate(model, params, prompt: Array, rng: Array, cache, *, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float) -> Array:
  logits, cache = model.apply(params, prompt, cache=cache)
  rng, first_rng = jax.random.split(rng)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  token = sample(logits[:, -1], first_rng)

  def step(carry, step_rng):
    token, cache = carry
    logits, cache = model.apply(params, token[:, None], cache=cache)
    next_token = sample(logits[:, -1], step_rng)
    return (next_token, cache), token

  (last, _), tokens = jax.lax.scan(step, (token, cache), jax.random.split(rng, max_new_tokens - 1))
  new = jnp.concatenate([tokens.T, last[:, None]], axis=1) if max_new_tokens > 1 else last[:, None]
  return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)
