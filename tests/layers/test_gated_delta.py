"""Tests for layers/gated_delta.py: the gated delta rule (a float64 numpy loop, a hand-worked
example, the chunked form against the token-by-token reference with gradients, memory) and the
GatedDeltaNet mixer (parallel == streaming, packing, causality, initialisation)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.gated_delta import GatedDeltaNet, delta_rule
from layers.gated_delta import gated_delta_rule as gdr_eager
from tests.layers.mixer_testing import check_bf16_against_float64, stream
from tests.layers.sequence_parallel_check import sequence_parallel_errors
from tests.numerics import rel

# Jitted once per shape: eager op-by-op dispatch would dominate the test time on CPU.
gdr = jax.jit(gdr_eager, static_argnames=("impl", "chunk_size", "scale"))

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def random_inputs(seed, batch=2, length=37, hk=2, hv=4, dk=6, dv=4, g_range=(1e-3, 5.0),
                  beta_max=1.0):
  """(q, k, v, g, beta, S0) float32 numpy. k has unit norm (the layer's L2 normalisation: the
  recurrence is a contraction there); -g log-uniform in g_range; beta ~ U(0.05, beta_max)."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s)
  k = f(batch, length, hk, dk)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  g = -np.exp(rng.uniform(math.log(g_range[0]), math.log(g_range[1]), (batch, length, hv)))
  beta = rng.uniform(0.05, beta_max, (batch, length, hv))
  arrays = (f(batch, length, hk, dk), k, f(batch, length, hv, dv), g, beta, f(batch, hv, dk, dv))
  return tuple(a.astype(np.float32) for a in arrays)


def packed_segments(batch, length):
  """Row 0: documents changing at 8 (a chunk boundary for chunk 8), 13 and 14 (a one-token
  document) and 30; row 1: one document."""
  row = np.zeros(length, np.int32)
  for cut in (8, 13, 14, 30):
    row[cut:] += 1
  return np.stack([row] + [np.full(length, 7, np.int32)] * (batch - 1))


def numpy_recurrence(q, k, v, g, beta, s0, seg, scale):
  """float64 loop over rows, value heads and tokens with the explicit matrix I - beta k k^T."""
  q, k, v, g, beta, s0 = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, s0))
  batch, length, hv, dv = v.shape
  rep = hv // q.shape[2]
  out, final = np.zeros(v.shape), np.zeros(s0.shape)
  for b in range(batch):
    for h in range(hv):
      S = s0[b, h].copy()
      for t in range(length):
        if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
          S = np.zeros_like(S)
        kt = k[b, t, h // rep]
        S = (np.exp(g[b, t, h]) * (np.eye(len(kt)) - beta[b, t, h] * np.outer(kt, kt)) @ S
             + beta[b, t, h] * np.outer(kt, v[b, t, h]))
        out[b, t, h] = scale * S.T @ q[b, t, h // rep]
      final[b, h] = S
  return out, final


# ----------------------------------------------------------------------------- the op


def test_reference_and_xla_match_numpy_float64():
  args = random_inputs(0, length=19)
  seg = packed_segments(2, 19)
  out_np, final_np = numpy_recurrence(*args, seg, scale=0.3)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    for impl in ("reference", "xla"):
      out, final = gdr(*args64[:5], scale=0.3, initial_state=args64[5], segment_ids=seg,
                       impl=impl, chunk_size=8)
      assert out.dtype == jnp.float64 and final.dtype == jnp.float64
      # In float64 the chunked algebra (UT transform, masks) must agree to rounding.
      assert rel(out, out_np) < 1e-12 and rel(final, final_np) < 1e-12, impl
  out32, final32 = gdr(*args[:5], scale=0.3, initial_state=args[5], segment_ids=seg,
                       impl="reference")
  assert out32.dtype == jnp.float32 and final32.dtype == jnp.float32
  assert rel(out32, out_np) < 1e-5 and rel(final32, final_np) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_hand_worked_delta_rule(impl):
  # One head, dim_k 2, dim_v 1, q = e1, scale 1. S_t = (I - b k k^T) S + b k v^T moves the value
  # read at k towards v by the fraction b:
  #   t=1  k = e1, v = 2, b = 1:      S = [2, 0]                       o = 2
  #   t=2  k = e1, v = 5, b = 1/2:    S = [2 + (5 - 2)/2, 0] = [3.5, 0]  o = 3.5
  #   t=3  k = (e1 + e2)/r2, v = 1, b = 1: the read S^T k = 3.5/r2 is replaced by 1:
  #        S = [3.5, 0] + (1 - 3.5/r2) k = [1.75 + 1/r2, 1/r2 - 1.75]   o = 1.75 + 1/r2
  # Gated, with g_2 = log(1/2): t=2 gives S = (1/2)[2 - 1, 0] + [2.5, 0] = [3, 0], then t=3
  # S = [3, 0] + (1 - 3/r2) k = [1.5 + 1/r2, 1/r2 - 1.5].
  r2 = math.sqrt(2.0)
  q = np.array([[1, 0], [1, 0], [1, 0]], np.float32).reshape(1, 3, 1, 2)
  k = np.array([[1, 0], [1, 0], [1 / r2, 1 / r2]], np.float32).reshape(1, 3, 1, 2)
  v = np.array([2, 5, 1], np.float32).reshape(1, 3, 1, 1)
  beta = np.array([1, 0.5, 1], np.float32).reshape(1, 3, 1)
  run = jax.jit(delta_rule, static_argnames=("impl", "chunk_size", "scale"))
  out, final = run(q, k, v, beta, scale=1.0, impl=impl, chunk_size=2)
  assert np.allclose(np.ravel(out), [2, 3.5, 1.75 + 1 / r2], rtol=1e-6)
  assert np.allclose(np.ravel(final), [1.75 + 1 / r2, 1 / r2 - 1.75], rtol=1e-6)
  g = np.array([0, math.log(0.5), 0], np.float32).reshape(1, 3, 1)
  out, final = gdr(q, k, v, g, beta, scale=1.0, impl=impl, chunk_size=2)
  assert np.allclose(np.ravel(out), [2, 3, 1.5 + 1 / r2], rtol=1e-6)
  assert np.allclose(np.ravel(final), [1.5 + 1 / r2, 1 / r2 - 1.5], rtol=1e-6)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _outputs_and_grads(impl, args, chunk_size, seg, wo, wf):
  def run(q, k, v, g, beta, s0):
    return gdr_eager(q, k, v, g, beta, initial_state=s0, segment_ids=seg, impl=impl,
                     chunk_size=chunk_size)

  def loss(*args):
    out, final = run(*args)
    return jnp.sum(out.astype(jnp.float32) * wo) + jnp.sum(final * wf)

  out, final = run(*args)
  return out, final, jax.grad(loss, argnums=tuple(range(6)))(*args)


def _weights(seed, args, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  # Representable in `dtype`, so the cotangent of a bf16 output is exact.
  wo = np.asarray(jnp.asarray(rng.normal(size=args[2].shape), dtype), np.float32)
  return wo, rng.normal(size=args[5].shape).astype(np.float32)


@pytest.mark.parametrize("length, g_range, beta_max, packed", [
    (32, (1e-3, 1e-2), 2.0, True),  # a multiple of the chunk; decay near 0; beta up to 2
    (37, (1e-3, 5.0), 1.0, True),   # not a multiple; decays from near 0 to strong
    (37, (1.0, 5.0), 1.0, False),   # strong decay only
])
def test_xla_matches_float64_reference_float32(length, g_range, beta_max, packed):
  args = random_inputs(length, length=length, g_range=g_range, beta_max=beta_max)
  seg = packed_segments(2, length) if packed else None
  wo, wf = _weights(1, args)
  out, final, grads = _outputs_and_grads("xla", args, 8, seg, wo, wf)
  out32, final32, grads32 = _outputs_and_grads("reference", args, 8, seg, wo, wf)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    ref64 = _outputs_and_grads("reference", args64, 8, seg, wo, wf)
    out64, final64, grads64 = jax.tree.map(np.asarray, ref64)
  assert out.dtype == jnp.float32 and final.dtype == jnp.float32
  for got, ref in ((out, out64), (final, final64), (out32, out64), (final32, final64)):
    assert rel(got, ref) < 1e-5
  for name, g, g32, g64 in zip(NAMES, grads, grads32, grads64):
    assert g.dtype == jnp.float32
    assert rel(g, g64) < 1e-5, name
    assert rel(g32, g64) < 1e-5, name


def test_xla_matches_reference_bf16_inputs():
  args = [jnp.asarray(a, jnp.bfloat16) for a in random_inputs(2, length=37)]
  seg = packed_segments(2, 37)
  wo, wf = _weights(3, args, jnp.bfloat16)
  with jax.enable_x64(True):  # float64 on the same (bf16-valued) inputs
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    float64 = _outputs_and_grads("reference", args64, 8, seg, wo, wf)
  check_bf16_against_float64(NAMES, _outputs_and_grads("xla", args, 8, seg, wo, wf),
                             _outputs_and_grads("reference", args, 8, seg, wo, wf), float64)


def test_forward_mode_matches_reference():
  # jax.jvp works through the chunked form (the triangular inverse has a JVP rule, not a VJP).
  # Chunk 32: two 16 x 16 blocks merged, on a length that is not a multiple of the chunk.
  args = random_inputs(10, length=45)
  tangents = random_inputs(11, length=45)

  def jvp(impl):
    run = lambda *a: gdr_eager(*a[:5], initial_state=a[5], impl=impl, chunk_size=32)
    return jax.jit(lambda p, t: jax.jvp(run, p, t))(args, tangents)

  (out, final), (d_out, d_final) = jvp("xla")
  (out_ref, final_ref), (d_out_ref, d_final_ref) = jvp("reference")
  for got, ref in ((out, out_ref), (final, final_ref), (d_out, d_out_ref),
                   (d_final, d_final_ref)):
    assert rel(got, ref) < 1e-5


def test_chunk_sizes_and_auto_agree():
  q, k, v, g, beta, s0 = random_inputs(4, length=40)
  seg = packed_segments(2, 40)
  ref = gdr(q, k, v, g, beta, initial_state=s0, segment_ids=seg, impl="reference")
  for chunk in (1, 64):  # one token per chunk; one chunk of 40 (its inverse padded to 64)
    got = gdr(q, k, v, g, beta, initial_state=s0, segment_ids=seg, impl="xla", chunk_size=chunk)
    assert rel(got[0], ref[0]) < 1e-5 and rel(got[1], ref[1]) < 1e-5, chunk
  got = gdr(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
  assert rel(got[0], ref[0]) < 1e-5 and rel(got[1], ref[1]) < 1e-5


def test_extreme_decay_has_finite_gradients():
  # Within a 64-token chunk the cumulative decay reaches about -3e3: exp underflows to 0 and
  # any exp(+Gamma) or inf - inf would give inf/NaN in the outputs or the gradients.
  args = random_inputs(5, batch=1, length=70, g_range=(20.0, 80.0))
  seg = np.array([[0] * 30 + [1] * 40], np.int32)
  wo, wf = _weights(6, args)
  out, final, grads = _outputs_and_grads("xla", args, 64, seg, wo, wf)
  out_ref, final_ref, grads_ref = _outputs_and_grads("reference", args, 64, seg, wo, wf)
  assert rel(out, out_ref) < 1e-5 and rel(final, final_ref) < 1e-5
  for name, g, g_ref in zip(NAMES, grads, grads_ref):
    assert rel(g, g_ref) < 1e-5, name


def test_packed_equals_separate_runs():
  q, k, v, g, beta, s0 = random_inputs(7, batch=1, length=30)
  cut = 13
  seg = np.array([[4] * cut + [9] * (30 - cut)], np.int32)
  out, final = gdr(q, k, v, g, beta, initial_state=s0, segment_ids=seg, chunk_size=8)
  part = lambda s: [a[:, s] for a in (q, k, v, g, beta)]
  first = gdr(*part(slice(0, cut)), initial_state=s0, chunk_size=8)
  second = gdr(*part(slice(cut, None)), chunk_size=8)  # initial_state reaches document 1 only
  assert rel(out[:, :cut], first[0]) < 1e-5
  assert rel(out[:, cut:], second[0]) < 1e-5
  assert rel(final, second[1]) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_causal_by_gradient(impl):
  q, k, v, g, beta, s0 = random_inputs(8, batch=1, length=20)
  i = 11

  def out_i(q, k, v, g, beta):
    return jnp.sum(gdr_eager(q, k, v, g, beta, initial_state=s0, impl=impl, chunk_size=8)[0][:, i])

  grads = jax.jit(jax.grad(out_i, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
  for name, grad in zip(NAMES, grads):
    grad = np.asarray(grad)
    assert np.all(grad[:, i + 1:] == 0), name
    assert np.abs(grad[:, :i + 1]).sum() > 0, name


def test_bad_inputs_name_the_argument():
  q, k, v, g, beta, s0 = random_inputs(9, length=6)
  with pytest.raises(ValueError, match="k must"):
    gdr_eager(q, k[..., :3], v, g, beta)
  with pytest.raises(ValueError, match="multiple"):
    gdr_eager(q, k, v[:, :, :3], g[..., :3], beta[..., :3])
  with pytest.raises(ValueError, match="beta"):
    gdr_eager(q, k, v, g, beta[:, :5])
  with pytest.raises(ValueError, match="initial_state"):
    gdr_eager(q, k, v, g, beta, initial_state=s0[:, :2])
  with pytest.raises(ValueError, match="segment_ids"):
    gdr_eager(q, k, v, g, beta, segment_ids=np.zeros((2, 5), np.int32))
  with pytest.raises(ValueError, match="impl"):
    gdr_eager(q, k, v, g, beta, impl="pallas9")
  with pytest.raises(ValueError, match="chunk_size"):
    gdr_eager(q, k, v, g, beta, impl="xla", chunk_size=0)


def test_xla_memory_is_linear_in_length():
  # Compile only: temporary memory of forward + backward at L and 2L (4 heads of dim 128).
  def temp_bytes(length):
    qkv = jax.ShapeDtypeStruct((1, length, 4, 128), jnp.float32)
    gb = jax.ShapeDtypeStruct((1, length, 4), jnp.float32)
    loss = lambda *a: jnp.sum(gdr_eager(*a, impl="xla")[0])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return grad.lower(qkv, qkv, qkv, gb, gb).compile().memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(16384), temp_bytes(32768)
  assert large / small < 2.3
  # And far from an [L, L] matrix (1 GiB at L = 16384 in float32).
  assert small < 2**30


# ----------------------------------------------------------------------------- the mixer

LAYER = dict(d_model=16, num_heads=2, head_dim_k=8, num_v_heads=4, expand_v=1.5, chunk_size=8)
LENGTH = 20
_APPLY = {}


def layer_and_params(seed=0, **kw):
  kw = {**LAYER, **kw}
  model = GatedDeltaNet(**kw)
  key = tuple(sorted(kw.items()))
  if key not in _APPLY:  # jitted once per configuration: the tests share the compilations
    _APPLY[key] = jax.jit(model.init), jax.jit(model.apply)
  init, apply = _APPLY[key]
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, LENGTH, LAYER["d_model"]))
  params = init(jax.random.PRNGKey(seed + 1), x)
  # The norm scale starts at 1: move it so that a wrong path through it shows.
  p = params["params"]
  p["o_norm"]["scale"] = p["o_norm"]["scale"] + 0.3 * jax.random.normal(jax.random.PRNGKey(7),
                                                                        p["o_norm"]["scale"].shape)
  return apply, model, params, x


def _stream_apply(apply):
  return lambda m, params, x, seg, cache: apply(params, x, segment_ids=seg, cache=cache)


def test_layer_init_matches_published():
  model = GatedDeltaNet(d_model=32, num_heads=4, head_dim_k=8, num_v_heads=64)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4, 32)))["params"]
  a = np.exp(np.asarray(params["A_log"]))
  assert a.shape == (64,) and np.all((a > 0) & (a <= 16)) and a.std() > 2  # U(0, 16): std 4.6
  dt = np.logaddexp(0.0, np.asarray(params["dt_bias"], np.float64))
  assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))
  assert np.ptp(np.log(dt)) > 2.5  # spread over the log range [log 1e-3, log 0.1]
  assert set(GatedDeltaNet.ssm_param_names) <= set(params)
  assert params["q_proj"]["kernel"].shape == (32, 32)
  assert params["v_proj"]["kernel"].shape == (32, 64 * 16)  # dim_v = expand_v * dim_k = 16
  assert params["o_norm"]["scale"].shape == (16,)  # per value head, shared by the heads


def test_layer_parallel_equals_streaming():
  apply, model, params, x = layer_and_params(0)
  y, _ = apply(params, x)
  run = _stream_apply(apply)
  y_tok, cache = stream(run, model, params, x, [1] * LENGTH)
  assert rel(y_tok, y) < 1e-5
  assert cache["ssm"].dtype == jnp.float32
  y_mix, _ = stream(run, model, params, x, [12] + [1] * (LENGTH - 12))  # prefill, then tokens
  assert rel(y_mix, y) < 1e-5


def test_layer_packed_equals_separate_and_streams():
  apply, model, params, x = layer_and_params(1)
  cut = 10
  seg = jnp.asarray(np.array([[0] * cut + [1] * (LENGTH - cut), [5] * LENGTH], np.int32))
  y, _ = apply(params, x, segment_ids=seg)
  # Whole-batch separate runs (fewer compilations), compared on the rows they stand for.
  assert rel(y[:1, :cut], apply(params, x[:, :cut])[0][:1]) < 1e-5
  assert rel(y[:1, cut:], apply(params, x[:, cut:])[0][:1]) < 1e-5
  assert rel(y[1:], apply(params, x)[0][1:]) < 1e-5

  run = _stream_apply(apply)
  # Chunks of 4: [8, 12) straddles row 0's document change.
  y_chunks, _ = stream(run, model, params, x, [4] * 5, seg)
  assert rel(y_chunks, y) < 1e-5
  # A chunk that opens a new document (first id != the cache's) drops the carried state.
  seg2 = jnp.asarray(np.array([[0] * 12 + [1] * 8] * 2, np.int32))
  y2, _ = apply(params, x, segment_ids=seg2)
  y_stream, cache = stream(run, model, params, x, [4] * 5, seg2)
  assert rel(y_stream, y2) < 1e-5
  assert np.all(np.asarray(cache["segment_id"]) == 1)


def test_layer_causal_by_gradient():
  apply, model, params, x = layer_and_params(2)
  i = 12
  grad = np.asarray(jax.grad(lambda x: jnp.sum(apply(params, x)[0][:, i]))(x))
  assert np.all(grad[:, i + 1:] == 0)
  assert np.abs(grad[:, :i + 1]).sum() > 0


def test_layer_neg_eigval_and_bf16():
  apply, model, params, x = layer_and_params(3, allow_neg_eigval=True)
  y32, _ = apply(params, x)
  y_two, _ = stream(_stream_apply(apply), model, params, x, [10, 10])
  assert rel(y_two, y32) < 1e-5
  y16, _ = apply(params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  # bf16 projections and activations (8-bit significand) through matmuls, conv and a norm.
  assert rel(y16, y32) < 3e-2


def test_layer_bad_config_names_field():
  with pytest.raises(ValueError, match="num_v_heads"):
    GatedDeltaNet(d_model=16, num_heads=3, num_v_heads=4).init_cache(1)
  with pytest.raises(ValueError, match="head_dim_v"):
    GatedDeltaNet(d_model=16, head_dim_k=5, expand_v=1.5).init_cache(1)
  with pytest.raises(ValueError, match="d_model"):
    GatedDeltaNet(d_model=16).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 8)))


def test_sequence_parallel_equals_whole_sequence():
  # seq_axis: the short convolutions' windows from the left neighbour, gated_delta_rule_local
  # (run the shard from zero, then add the carried-in state); 4 shards, documents crossing shards.
  kwargs = dict(num_heads=2, head_dim_k=8, chunk_size=4)
  errors = sequence_parallel_errors({"causal": ("gated_deltanet", kwargs)})["causal"]
  assert len(errors) == 5
  for key, err in errors.items():
    assert err < 1e-5, (key, err)


def test_layer_scanned_batch_rows_equal_single_rows():
  # Regression: two GatedDeltaNet layers under nn.scan (stacked params), one chunk per row, batch
  # 128: XLA:CPU (jaxlib 0.10.2) fused the chunk's matmul with the zero initial state into a
  # YNNPACK kernel with the RMSNorm and returned rows off by ~1-4, or NaN, varying run to run.
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      y, _ = GatedDeltaNet(d_model=32, num_heads=1, head_dim_k=32, impl="xla")(x)
      return x + y, None

  stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                  in_axes=(nn.broadcast,))()
  x = jax.random.normal(jax.random.PRNGKey(0), (128, 32, 32))
  params = stack.init(jax.random.PRNGKey(1), x[:1], None)
  apply = jax.jit(lambda p, x: stack.apply(p, x, None)[0])
  y = np.asarray(apply(params, x))
  for i in range(x.shape[0]):
    assert rel(y[i], apply(params, x[i:i + 1])[0]) < 1e-5, i
