"""Tests for layers/pallas/attention.py: the flash-attention kernels, both drivers (the GPU
key-block loop and the TPU grid of visited blocks), against the dense reference (outputs and the
gradients of q, k, v); a zero gradient outside the window; the visited blocks;
`prefix_window_attention`'s dispatch to them; their lowering for GPU (Triton) and TPU (Mosaic),
forward and backward. Where each driver runs (interpreted on CPU, compiled on its own hardware):
tests/pallas_modes.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import documents, prefix_window_attention, window_attention
from layers.pallas import attention as kernel
from tests import pallas_modes
from tests.layers.test_attention import random_qkv, random_segments
from tests.numerics import rel

STATIC = ("window", "causal", "softcap", "q_offset", "platform", "block")


def loss_and_grads(fn, q, k, v, weights):
  """fn(q, k, v) and the gradients of <fn(q, k, v), weights> in q, k, v."""
  loss = lambda q, k, v: (lambda out: (jnp.sum(out.astype(jnp.float32) * weights), out))(
      fn(q, k, v))
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@functools.partial(jax.jit, static_argnames=STATIC + ("interpret",))
def pallas_run(q, k, v, q_docs, kv_docs, weights, *, window, causal, softcap, q_offset,
               platform, block, interpret):
  fn = functools.partial(kernel.prefix_window_attention_pallas, q_docs=q_docs, kv_docs=kv_docs,
                         window=window, causal=causal, softcap=softcap, q_offset=q_offset,
                         interpret=interpret, platform=platform, block_q=block, block_k=block)
  return loss_and_grads(fn, q, k, v, weights)


@functools.partial(jax.jit, static_argnames=STATIC)
def reference_run(q, k, v, q_docs, kv_docs, weights, *, window, causal, softcap, q_offset,
                  platform=None, block=None):
  del platform, block
  fn = functools.partial(prefix_window_attention, q_docs=q_docs, kv_docs=kv_docs, window=window,
                         causal=causal, softcap=softcap, q_offset=q_offset, impl="reference")
  return loss_and_grads(fn, q, k, v, weights)


def compare(seed, *, dtype=jnp.float32, lq=40, lk=None, heads=4, kv_heads=2, window=5,
            causal=True, softcap=None, q_offset=None, packed=True, empty_slots=False,
            platform=None, block=16):
  """Kernel vs dense reference (batch 2, head_dim 12, padded to 16): relative errors of the
  output and of dq, dk, dv."""
  lk = lq if lk is None else lk
  q, k, v = (jnp.asarray(a, dtype) for a in random_qkv(seed, lq=lq, lk=lk, heads=heads,
                                                       kv_heads=kv_heads, head_dim=12))
  kv_docs = np.zeros((2, lk), np.int32)
  if packed:
    kv_docs = np.array(documents(random_segments(seed + 1, 2, lk)))
  if empty_slots:  # keys of document -1 (empty cache slots) are never visible
    kv_docs[0, :7] = -1
  start = lk - lq if q_offset is None else q_offset
  q_docs = kv_docs[:, start:start + lq]
  weights = jnp.asarray(np.random.default_rng(seed + 2).normal(size=q.shape[:3] + (12,)),
                        jnp.float32)
  kw = dict(window=window, causal=causal, softcap=softcap, q_offset=q_offset)
  out, grads = pallas_run(q, k, v, q_docs, kv_docs, weights, platform=platform, block=block,
                          interpret=pallas_modes.interpret(platform), **kw)
  out_r, grads_r = reference_run(q, k, v, q_docs, kv_docs, weights, **kw)
  assert out.dtype == dtype
  errors = {"out": rel(out, out_r)}
  for name, g, g_r in zip("qkv", grads, grads_r):
    assert g.dtype == dtype, name
    errors[f"d{name}"] = rel(g, g_r)
  return errors


CASES = {  # blocks of 16 queries and keys; lengths 40 (not a multiple) and 64
    "window<block,gqa,packed": dict(window=5),
    "window=block,mqa,softcap": dict(window=16, lq=64, heads=2, kv_heads=1, softcap=3.0,
                                     packed=False),
    "window>block,tpu": dict(window=21, platform="tpu"),
    "global,tpu,softcap": dict(window=None, softcap=5.0, platform="tpu"),
    "bidirectional_window": dict(window=7, causal=False),
    "bidirectional_global,tpu": dict(window=None, causal=False, platform="tpu", kv_heads=1),
    # 24 queries at key indices 10..33 of 45 (a sequence shard between its neighbours' keys),
    # 7 keys of document -1; and the last 24 of 45 (queries after a cached prefix).
    "q_offset,empty_slots": dict(window=9, lq=24, lk=45, q_offset=10, empty_slots=True),
    "prefix,tpu": dict(window=20, lq=24, lk=45, empty_slots=True, platform="tpu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_reference(case):
  errors = compare(0, **CASES[case])
  assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_bfloat16_inputs_match_reference(platform):
  errors = compare(1, dtype=jnp.bfloat16, window=13, softcap=5.0, platform=platform)
  assert max(errors.values()) < 1e-2, errors


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_no_gradient_outside_the_window(platform):
  # The loss reads the outputs of queries 40.. only: keys before 40 - (w - 1) = 35 and after 47
  # are outside every window it reads, and get exactly zero gradient.
  q, k, v = (jnp.asarray(a) for a in random_qkv(3, batch=1, lq=48, kv_heads=1))
  docs = jnp.zeros((1, 48), jnp.int32)
  weights = jnp.zeros((1, 48, 4, 8)).at[:, 40:].set(1.0)
  _, (dq, dk, dv) = pallas_run(q, k, v, docs, docs, weights, window=6, causal=True,
                               softcap=None, q_offset=None, platform=platform, block=16,
                               interpret=pallas_modes.interpret(platform))
  for g in (dk, dv):
    g = np.abs(np.asarray(g))[0, :, 0].sum(-1)
    assert np.all(g[:35] == 0) and np.all(g[35:] > 0)
  dq = np.abs(np.asarray(dq))[0].sum((-1, -2))
  assert np.all(dq[:40] == 0) and np.all(dq[40:] > 0)


def test_dispatch():
  q, k, v = (jnp.asarray(a) for a in random_qkv(4, lq=40))
  seg = jnp.asarray(random_segments(5, 2, 40))
  run = jax.jit(window_attention, static_argnames=("window", "impl", "block_size"))
  # "auto" is the XLA form on CPU (40 queries > block_size 16), the kernel on GPU/TPU, bit for bit.
  np.testing.assert_array_equal(run(q, k, v, window=6, segment_ids=seg, impl="auto",
                                    block_size=16),
                                run(q, k, v, window=6, segment_ids=seg,
                                    impl=pallas_modes.AUTO_IMPL, block_size=16))
  # "pallas" runs the kernel (compiled on GPU/TPU, interpreted on CPU).
  out = run(q, k, v, window=6, segment_ids=seg, impl="pallas")
  assert rel(out, run(q, k, v, window=6, segment_ids=seg, impl="reference")) < 1e-5
  # Unsupported calls: a reason from `supports`, a ValueError naming it from impl="pallas".
  docs = jnp.zeros((2, 40), jnp.int32)
  assert kernel.supports(q, k, v, docs, docs, window=6) is None
  assert "one dtype" in kernel.supports(q, k, v.astype(jnp.bfloat16), docs, docs)
  with pytest.raises(ValueError, match="one dtype"):
    window_attention(q, k, v.astype(jnp.bfloat16), impl="pallas")
  wide = jnp.zeros((1, 8, 1, 512))
  assert "head_dim 512" in kernel.supports(wide, wide, wide)
  with pytest.raises(ValueError, match="head_dim 512"):
    window_attention(wide, wide, wide, impl="pallas")
  with jax.enable_x64(True):
    q64 = jnp.asarray(q, jnp.float64)
    assert "float64" in kernel.supports(q64, k, v, docs, docs)
    with pytest.raises(ValueError, match="float64"):
      window_attention(q64, q64[:, :, :2], q64[:, :, :2], impl="pallas")
  with pytest.raises(ValueError, match="block_q"):
    kernel.prefix_window_attention_pallas(q, k, v, q_docs=docs, kv_docs=docs, block_q=24)


@pytest.mark.parametrize("platform,lowering_platform,target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_forward_and_backward(platform, lowering_platform, target):
  # Lowering only (no compile): catches primitives or block shapes a backend cannot take. Default
  # blocks, a length not a multiple of them, GQA, head_dim 128, a window, a soft-cap, documents.
  batch, length, heads, kv_heads, d = 2, 1000, 8, 2, 128
  spec = jax.ShapeDtypeStruct
  args = (spec((batch, length, heads, d), jnp.bfloat16),
          spec((batch, length, kv_heads, d), jnp.bfloat16),
          spec((batch, length, kv_heads, d), jnp.bfloat16), spec((batch, length), jnp.int32))

  def forward(q, k, v, docs):
    return kernel.prefix_window_attention_pallas(q, k, v, q_docs=docs, kv_docs=docs, window=256,
                                                 softcap=30.0, interpret=False,
                                                 platform=platform)

  loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32))
  for fn in (forward, jax.grad(loss, argnums=(0, 1, 2))):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering_platform,)).as_text()
    assert text.count(f"custom_call @{target}") == (1 if fn is forward else 3)


@pytest.mark.parametrize("window,causal,q_offset", [
    (5, True, 0), (16, True, 0), (40, True, 0), (None, True, 0), (7, False, 0), (None, False, 0),
    (9, True, 10), (20, False, 21)])
def test_visits_exactly_the_blocks_with_a_visible_pair(window, causal, q_offset):
  # Brute force over positions (documents aside): block pairs holding some (i, j) with
  # j - (P + i) inside the window, against the blocks the kernels visit (forward and dq: key
  # blocks per query block; dk, dv: query blocks per key block).
  lq, lk, bq, bk = 24 if q_offset else 45, 45, 16, 8
  cfg = kernel._Config(window, causal, None, 1.0, q_offset, lq, lk, bq, bk, 1, False, True,
                       "cpu")
  d = q_offset + np.arange(lq)[:, None] - np.arange(lk)[None, :]
  w = np.inf if window is None else window
  seen = ((d >= 0) if causal else (d > -w)) & (d < w)
  needed = {(i // bq, j // bk) for i, j in zip(*np.nonzero(seen))}
  by_query, by_key = set(), set()
  for c in range(cfg.nq):
    first, count = kernel._key_blocks(cfg, c, kernel._NP)
    by_query |= {(c, int(first) + n) for n in range(int(count))}
  for kb in range(cfg.nk):
    first, count = kernel._query_blocks(cfg, kb, kernel._NP)
    by_key |= {(int(first) + n, kb) for n in range(int(count))}
  assert by_query == needed and by_key == needed
