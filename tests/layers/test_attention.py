"""Tests for layers/attention.py: window attention against a float64 numpy loop and the dense
reference (outputs and gradients), window and causality by gradient, memory of the blocked form,
and the Attention layer (parallel == streaming through the ring buffer, packing, global cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import Attention, prefix_window_attention, window_attention
from tests.layers.mixer_testing import stream
from tests.layers.sequence_parallel_check import sequence_parallel_errors
from tests.numerics import rel

STATIC = ("window", "causal", "softcap", "scale", "impl", "block_size")
# Jitted once per shape: eager op-by-op dispatch would dominate the test time on CPU.
attention = jax.jit(window_attention, static_argnames=STATIC)
prefix_attention = jax.jit(prefix_window_attention, static_argnames=STATIC)


def random_qkv(seed, batch=2, lq=37, heads=4, kv_heads=2, head_dim=8, lk=None, dtype=np.float32):
  rng = np.random.default_rng(seed)
  lk = lq if lk is None else lk
  f = lambda *s: rng.normal(size=s).astype(dtype)
  return f(batch, lq, heads, head_dim), f(batch, lk, kv_heads, head_dim), f(batch, lk, kv_heads,
                                                                            head_dim)


def random_segments(seed, batch, length):
  """Runs of ids drawn from {0, 1, 2}: an id may come back later ([0, 1, 0] is three documents)."""
  rng = np.random.default_rng(seed)
  starts = rng.random((batch, length)) < 0.2
  return (np.cumsum(starts, axis=1) % 3).astype(np.int32)


def numpy_attention(q, k, v, visible, *, softcap=None, scale=None):
  """float64 loop: out[b, i, h] = softmax over {j : visible(b, i, j)} of scale q.k (capped)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, lq, heads, d = q.shape
  rep = heads // k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros((batch, lq, heads, v.shape[-1]))
  for b in range(batch):
    for i in range(lq):
      js = [j for j in range(k.shape[1]) if visible(b, i, j)]
      for h in range(heads):
        if not js:
          continue
        s = scale * k[b, js, h // rep] @ q[b, i, h]
        if softcap is not None:
          s = softcap * np.tanh(s / softcap)
        p = np.exp(s - s.max())
        out[b, i, h] = p @ v[b, js, h // rep] / p.sum()
  return out


def sequence_visible(window, causal, seg):
  """The docstring's rule on one sequence; documents are runs of equal ids."""
  def visible(b, i, j):
    if causal and j > i:
      return False
    if window is not None and abs(i - j) >= window:
      return False
    lo, hi = min(i, j), max(i, j)
    return seg is None or bool(np.all(seg[b, lo:hi + 1] == seg[b, i]))
  return visible


# ----------------------------------------------------------------------------- the op

CASES = {  # name: (window, causal, softcap, block_size, length, kv_heads, packed)
    "window<block": (3, True, None, 8, 37, 2, True),
    "window=block,mqa": (8, True, None, 8, 32, 1, False),
    "window>block,softcap": (13, True, 5.0, 8, 37, 2, True),
    "global": (None, True, None, 8, 37, 4, True),
    "noncausal_window": (5, False, None, 8, 29, 2, True),
    "noncausal_global,softcap": (None, False, 3.0, 8, 21, 1, False),
}


def _value_and_grads(args, cotangent, **kw):
  out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kw), *args)
  return out, vjp(jnp.asarray(cotangent, out.dtype))


value_and_grads = jax.jit(_value_and_grads, static_argnames=STATIC)


@pytest.mark.parametrize("case", ["window<block", "global", "noncausal_window"])
def test_both_impls_match_numpy_float64(case):
  window, causal, softcap, block, _, kv_heads, packed = CASES[case]
  q, k, v = random_qkv(1, lq=13, kv_heads=kv_heads)
  seg = random_segments(2, 2, 13) if packed else None
  want = numpy_attention(q, k, v, sequence_visible(window, causal, seg), softcap=softcap)
  with jax.enable_x64(True):
    for impl in ("reference", "xla"):
      out = attention(*(jnp.asarray(a, jnp.float64) for a in (q, k, v)), window=window,
                      causal=causal, softcap=softcap, segment_ids=seg, impl=impl, block_size=4)
      assert out.dtype == jnp.float64
      assert rel(out, want) < 1e-12, impl


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_float64_reference_float32(case):
  window, causal, softcap, block, length, kv_heads, packed = CASES[case]
  args = random_qkv(3, lq=length, kv_heads=kv_heads)
  seg = random_segments(4, 2, length) if packed else None
  dout = np.random.default_rng(5).normal(size=args[0].shape).astype(np.float32)
  kw = dict(window=window, causal=causal, softcap=softcap, segment_ids=seg, block_size=block)
  out, grads = value_and_grads(args, dout, impl="xla", **kw)
  with jax.enable_x64(True):
    out64, grads64 = value_and_grads([jnp.asarray(a, jnp.float64) for a in args], dout,
                                     impl="reference", **kw)
    out64, grads64 = jax.tree.map(np.asarray, (out64, grads64))
  assert out.dtype == jnp.float32 and rel(out, out64) < 1e-5
  for name, g, g64 in zip("qkv", grads, grads64):
    assert g.dtype == jnp.float32 and rel(g, g64) < 1e-5, name


@pytest.mark.parametrize("case", ["window>block,softcap"])
def test_xla_matches_reference_bf16(case):
  window, causal, softcap, block, length, kv_heads, packed = CASES[case]
  args = [jnp.asarray(a, jnp.bfloat16) for a in random_qkv(6, lq=length, kv_heads=kv_heads)]
  seg = random_segments(7, 2, length)
  # bf16-representable cotangent, so every path differentiates the same function.
  dout = np.asarray(jnp.asarray(np.random.default_rng(8).normal(size=args[0].shape),
                                jnp.bfloat16), np.float32)
  kw = dict(window=window, causal=causal, softcap=softcap, segment_ids=seg, block_size=block)
  out, grads = value_and_grads(args, dout, impl="xla", **kw)
  out_ref, grads_ref = value_and_grads(args, dout, impl="reference", **kw)
  with jax.enable_x64(True):  # float64 on the same bf16-valued inputs
    out64, grads64 = value_and_grads([jnp.asarray(a, jnp.float64) for a in args], dout,
                                     impl="reference", **kw)
    out64, grads64 = jax.tree.map(np.asarray, (out64, grads64))
  assert out.dtype == jnp.bfloat16
  # Both accumulate in float32: against float64 only the final bf16 rounding (2^-8 relative per
  # element at most) remains.
  assert rel(out, out_ref) < 1e-2 and rel(out, out64) < 5e-3 and rel(out_ref, out64) < 5e-3
  for name, g, g_ref, g64 in zip("qkv", grads, grads_ref, grads64):
    assert g.dtype == jnp.bfloat16
    assert rel(g, g_ref) < 1e-2 and rel(g, g64) < 5e-3, name


def test_prefix_with_empty_slots_and_empty_rows():
  # 9 queries after a 14-key prefix (as over a KV cache); some keys are empty slots (doc -1), and
  # the queries of document 7 have no key at all: they output exactly 0 and pass no gradient.
  q, k, v = random_qkv(9, lq=9, lk=23)
  q_docs = np.array([[0] * 5 + [1] * 4, [2] * 3 + [7] * 6], np.int32)
  kv_docs = np.concatenate([np.array([[-1] * 6 + [0] * 8, [-1] * 2 + [2] * 12]), q_docs],
                           axis=1).astype(np.int32)
  kv_docs[1, 14 + 3:] = 3  # the queries of doc 7 see no key
  kw = dict(q_docs=q_docs, kv_docs=kv_docs, window=6, block_size=4)

  def visible(b, i, j):
    d = 14 + i - j
    return kv_docs[b, j] >= 0 and kv_docs[b, j] == q_docs[b, i] and 0 <= d < 6

  want = numpy_attention(q, k, v, visible)
  dout = np.random.default_rng(10).normal(size=q.shape).astype(np.float32)
  for impl in ("reference", "xla"):
    out, vjp = jax.vjp(lambda q, k, v: prefix_attention(q, k, v, impl=impl, **kw), q, k, v)
    dq, dk, dv = vjp(jnp.asarray(dout))
    assert rel(out, want) < 1e-5, impl
    assert np.all(np.asarray(out)[1, 3:] == 0), impl
    assert np.all(np.isfinite(dq)) and np.all(np.asarray(dq)[1, 3:] == 0), impl
    assert np.all(np.asarray(dk)[kv_docs < 0] == 0) and np.all(np.asarray(dv)[kv_docs < 0] == 0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("window", [5, None])
def test_gradient_is_zero_outside_the_window(impl, window):
  q, k, v = random_qkv(11, batch=1, lq=30, kv_heads=1)
  i = 17

  def out_i(q, k, v):
    return jnp.sum(attention(q, k, v, window=window, impl=impl, block_size=4)[:, i])

  dq, dk, dv = jax.jit(jax.grad(out_i, argnums=(0, 1, 2)))(q, k, v)
  lo = 0 if window is None else i - window + 1
  for g in (dk, dv):
    g = np.abs(np.asarray(g))[0, :, 0].sum(-1)
    assert np.all(g[i + 1:] == 0) and np.all(g[:lo] == 0)  # future, and past the window
    assert np.all(g[lo:i + 1] > 0)
  dq = np.abs(np.asarray(dq))[0].sum((-1, -2))
  assert dq[i] > 0 and np.all(np.delete(dq, i) == 0)


def _temp_bytes(length, grad, window=512):
  sds = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)
  f = lambda q, k, v: window_attention(q, k, v, window=window, impl="xla")
  if grad:
    f = jax.grad(lambda q, k, v: jnp.sum(window_attention(q, k, v, window=window, impl="xla")),
                 argnums=(0, 1, 2))
  compiled = jax.jit(f).lower(sds, sds, sds).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True])
def test_memory_grows_as_length_times_window(grad):
  length = 32768
  small, large = _temp_bytes(length, grad), _temp_bytes(2 * length, grad)
  assert small < length * length * 4 / 20  # dense float32 scores would be L*L*4 = 4.3 GB
  assert 1.6 < large / small < 2.4


def test_auto_and_block_sizes_agree():
  q, k, v = random_qkv(12, lq=21)
  seg = random_segments(13, 2, 21)
  ref = attention(q, k, v, window=6, segment_ids=seg, impl="reference")
  # Block 1; and 64, a single block, which "auto" sends to the dense form.
  for block, impl in ((1, "xla"), (64, "xla"), (64, "auto")):
    out = attention(q, k, v, window=6, segment_ids=seg, impl=impl, block_size=block)
    assert rel(out, ref) < 1e-5, (block, impl)


def test_bad_inputs_name_the_argument():
  q, k, v = random_qkv(14, lq=6)
  with pytest.raises(ValueError, match="multiple of k's kv_heads"):
    window_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="segment_ids"):
    window_attention(q, k, v, segment_ids=np.zeros((2, 5), np.int32))
  with pytest.raises(ValueError, match="window"):
    window_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="impl"):
    window_attention(q, k, v, impl="pallas9")
  with pytest.raises(ValueError, match="v must be"):
    window_attention(q, k, v[:, :5])
  with pytest.raises(ValueError, match="kv_docs"):
    prefix_window_attention(q, k, v, q_docs=np.zeros((2, 6)), kv_docs=np.zeros((2, 5)))


# ----------------------------------------------------------------------------- the layer

LAYERS = {
    "window": dict(num_heads=4, num_kv_heads=2, window=5),
    "global": dict(num_heads=4, num_kv_heads=2, window=None, max_length=32),
    "window,mqa,qk_norm,softcap": dict(num_heads=4, num_kv_heads=1, window=4, qk_norm=True,
                                       softcap=3.0),
}


def _apply(m, params, x, segment_ids, cache):
  return m.apply(params, x, segment_ids=segment_ids, cache=cache)


apply = jax.jit(_apply, static_argnums=0)


def layer_and_params(seed=0, length=23, **kw):
  m = Attention(d_model=16, block_size=8, **kw)
  x = jax.random.normal(jax.random.key(seed), (2, length, 16))
  params = jax.jit(m.init)(jax.random.key(seed + 1), x)
  return m, params, x


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_parallel_equals_streaming(name):
  m, params, x = layer_and_params(0, **LAYERS[name])
  y, cache = apply(m, params, x, None, None)
  assert cache is None
  y_tok, _ = stream(apply, m, params, x, [1] * 23)
  assert rel(y_tok, y) < 1e-5
  # Prefill with a prompt longer than the window (11 > 5), a token, then a chunk over the cache.
  y_pre, cache = stream(apply, m, params, x, [11, 1, 11])
  assert rel(y_pre, y) < 1e-5
  assert np.all(np.asarray(cache["position"]) == 23)


def test_layer_packed_equals_separate_runs_and_streams():
  m, params, x = layer_and_params(1, **LAYERS["window"])
  seg = jnp.asarray(np.array([[0] * 9 + [1] * 14, [3] * 14 + [5] * 9], np.int32))
  y, _ = apply(m, params, x, seg, None)
  # RoPE positions restart at each document, so a document run alone gives the same outputs.
  for b, cut in ((0, 9), (1, 14)):
    y_a, _ = apply(m, params, x[b:b + 1, :cut], None, None)
    y_b, _ = apply(m, params, x[b:b + 1, cut:], None, None)
    assert rel(y[b:b + 1, :cut], y_a) < 1e-5 and rel(y[b:b + 1, cut:], y_b) < 1e-5
  # Chunk 6:14 straddles row 0's document change and is longer than the window; chunk 14:23
  # opens row 1's second document (its first id differs from the cache's).
  y_s, cache = stream(apply, m, params, x, [6, 8, 9], seg)
  assert rel(y_s, y) < 1e-5
  assert np.all(np.asarray(cache["segment_id"]) == [1, 5])
  assert np.all(np.asarray(cache["position"]) == [14, 9])


def test_ring_buffer_streams_hundreds_of_tokens_in_constant_memory():
  window, length = 8, 300
  m, params, x = layer_and_params(2, length=length, num_heads=2, window=window)
  y, _ = apply(m, params, x, None, None)

  def run(params, x, cache):
    def step(cache, x_t):
      y_t, cache = m.apply(params, x_t[:, None], cache=cache)
      return cache, y_t[:, 0]
    cache, ys = jax.lax.scan(step, cache, jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1), cache

  y_s, cache = jax.jit(run)(params, x, m.init_cache(2))
  assert rel(y_s, y) < 1e-5
  # The ring holds exactly the last `window` positions, position p in slot p mod window.
  held = np.asarray(cache["slot_position"])
  assert np.all(held == _ring_positions(length, window)[None])
  # Same cache (shapes, dtypes, bytes) after 10 and after 10 000 tokens.
  def spec_after(n):
    xs = jax.ShapeDtypeStruct((2, n, 16), jnp.float32)
    return jax.eval_shape(run, params, xs, m.init_cache(2))[1]
  after_10, after_10000 = spec_after(10), spec_after(10000)
  assert jax.tree.structure(after_10) == jax.tree.structure(after_10000)
  assert jax.tree.leaves(after_10) == jax.tree.leaves(after_10000)
  assert after_10["k"].shape == (2, window, 2, 8)
  nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  assert nbytes(after_10) == nbytes(after_10000) == nbytes(cache)


def _ring_positions(length, window):
  """[window]: the position each slot holds after `length` tokens (slot = position mod window)."""
  out = np.zeros(window, np.int64)
  for p in range(length - window, length):
    out[p % window] = p
  return out


@pytest.mark.parametrize("name", ["window", "global"])
def test_layer_causal_and_windowed_by_gradient(name):
  m, params, x = layer_and_params(3, **LAYERS[name])
  i = 15
  g = jax.jit(jax.grad(lambda x: jnp.sum(apply(m, params, x, None, None)[0][:, i])))(x)
  g = np.abs(np.asarray(g)).sum(-1)
  window = LAYERS[name]["window"]
  lo = 0 if window is None else i - window + 1
  assert np.all(g[:, i + 1:] == 0) and np.all(g[:, :lo] == 0)
  assert np.all(g[:, lo:i + 1] > 0)


def test_global_cache_overflow_is_an_error():
  m, params, x = layer_and_params(4, length=12, num_heads=2, window=None, max_length=8)
  with pytest.raises(ValueError, match="max_length"):  # one chunk longer than the cache: traced
    apply(m, params, x, None, m.init_cache(2))
  same = jnp.zeros((2, 6), jnp.int32)
  _, cache = apply(m, params, x[:, :6], same, m.init_cache(2))
  with pytest.raises(Exception, match="max_length is 8"):  # 12 > 8 tokens: at run time
    jax.block_until_ready(apply(m, params, x[:, 6:], same, cache))
  # A new document restarts the positions, so the same chunk is fine there.
  _, cache = apply(m, params, x[:, 6:], same + 1, cache)
  assert np.all(np.asarray(cache["position"]) == 6)


def test_layer_bf16_close_to_float32():
  m, params, x = layer_and_params(5, **LAYERS["window"])
  y32, _ = apply(m, params, x, None, None)
  y16, _ = apply(m, params, x.astype(jnp.bfloat16), None, None)
  assert y16.dtype == jnp.bfloat16
  # bf16 projections and activations (8-bit significand) through three matmuls and RoPE.
  assert rel(y16, y32) < 3e-2


def test_layer_parameters_and_bad_config():
  m = Attention(d_model=16, **LAYERS["window,mqa,qk_norm,softcap"])
  p = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 3, 16)))["params"]
  assert Attention.ssm_param_names == ()
  assert set(p) == {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
  assert p["q_proj"]["kernel"].shape == (16, 16) and p["k_proj"]["kernel"].shape == (16, 4)
  with pytest.raises(ValueError, match="num_kv_heads"):
    Attention(d_model=16, num_heads=4, num_kv_heads=3).init_cache(1)
  m2 = Attention(d_model=16, num_heads=4, causal=False, window=4)
  with pytest.raises(ValueError, match="causal"):
    m2.apply({"params": {}}, jnp.ones((1, 2, 16)), cache=m2.init_cache(1))


def test_sequence_parallel_equals_whole_sequence():
  # 4 shards of 8 tokens (and seq=2 x data=2): windows of 12 reach two neighbours (to the left;
  # to both sides when bidirectional, the queries then in the middle of the span: q_offset),
  # global causal and bidirectional gather the keys; GQA 2/1, block_size 4 (the xla form).
  base = dict(num_heads=2, num_kv_heads=1, block_size=4)
  errors = sequence_parallel_errors({
      "sliding_12,softcap": ("attention", dict(base, window=12, softcap=5.0)),
      "global_causal": ("attention", base),
      "bidirectional_12,qk_norm": ("attention", dict(base, window=12, causal=False,
                                                     qk_norm=True)),
      "bidirectional_global": ("attention", dict(base, causal=False)),
  })
  for label, errs in errors.items():
    for key, err in errs.items():
      assert err < 1e-5, (label, key, err)
  # q_offset: 6 queries at key indices 5..10 of 16, a bidirectional window of 4.
  q, k, v = random_qkv(15, lq=6, lk=16)
  want = numpy_attention(q, k, v, lambda b, i, j: abs(5 + i - j) < 4)
  docs = dict(q_docs=np.zeros((2, 6), np.int32), kv_docs=np.zeros((2, 16), np.int32))
  for impl in ("reference", "xla"):
    out = prefix_window_attention(q, k, v, window=4, causal=False, q_offset=5, impl=impl,
                                  block_size=4, **docs)
    assert rel(out, want) < 1e-5, impl
  with pytest.raises(ValueError, match="q_offset"):
    prefix_window_attention(q, k, v, q_offset=11, **docs)
  m = Attention(d_model=16, num_heads=2, seq_axis="seq")
  with pytest.raises(ValueError, match="seq_axis"):
    m.apply({"params": {}}, jnp.ones((1, 2, 16)), cache=m.init_cache(1))
