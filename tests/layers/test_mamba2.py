"""Tests for layers/mamba2.py: the SSD scan (against float64 numpy forms of the paper's equations
and against the token-by-token reference) and the Mamba2 block (parallel == streaming, packing,
causality, initialisation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.mamba2 import Mamba2
from layers.mamba2 import ssd as ssd_eager
from tests.layers.mixer_testing import check_bf16_against_float64
from tests.layers.sequence_parallel_check import sequence_parallel_errors
from tests.numerics import rel

# Jitted once per shape: eager op-by-op dispatch would dominate the test time on CPU.
ssd = jax.jit(ssd_eager, static_argnames=("chunk_size", "impl"))


def random_inputs(seed, batch=2, length=37, heads=4, head_dim=3, groups=2, d_state=5,
                  dt_range=(1e-2, 1.0)):
  """(x, dt, A, B, C, D, h0) float32 numpy; A in [-16, -1] as Mamba-2's init, dt log-uniform."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  dt = np.exp(rng.uniform(np.log(dt_range[0]), np.log(dt_range[1]), (batch, length, heads)))
  A = -rng.uniform(1.0, 16.0, heads)
  return (f(batch, length, heads, head_dim), dt.astype(np.float32), A.astype(np.float32),
          f(batch, length, groups, d_state), f(batch, length, groups, d_state), f(heads),
          f(batch, heads, head_dim, d_state))


def random_segments(seed, batch, length, n_docs=3):
  """[batch, length] sorted ids with a few documents per row (some possibly 1 token long)."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.integers(0, n_docs, (batch, length)), axis=1).astype(np.int32)


def numpy_recurrence(x, dt, A, B, C, D, h0, seg):
  """float64 loop over tokens and heads: h = exp(dt A) h + dt x B^T, y = h C + D x."""
  x, dt, A, B, C, D, h0 = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, h0))
  batch, length, heads, _ = x.shape
  rep = heads // B.shape[2]
  y, final = np.zeros_like(x), h0.copy()
  for b in range(batch):
    for h in range(heads):
      state = h0[b, h].copy()
      for t in range(length):
        if t > 0 and seg[b, t] != seg[b, t - 1]:
          state = np.zeros_like(state)
        state = (np.exp(dt[b, t, h] * A[h]) * state
                 + dt[b, t, h] * np.outer(x[b, t, h], B[b, t, h // rep]))
        y[b, t, h] = state @ C[b, t, h // rep] + D[h] * x[b, t, h]
      final[b, h] = state
  return y, final


def numpy_quadratic(x, dt, A, B, C, D, h0, seg):
  """float64 "attention" form: y_i = sum_{j<=i, same doc} (C_i.B_j) exp(sum_{j<k<=i} dt_k A)
  dt_j x_j + exp(sum_{k<=i} dt_k A) h0 C_i [no document change in 1..i] + D x_i."""
  x, dt, A, B, C, D, h0 = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, h0))
  batch, length, heads, _ = x.shape
  rep = heads // B.shape[2]
  y = np.zeros_like(x)
  for b in range(batch):
    doc = np.concatenate([[0], np.cumsum(seg[b, 1:] != seg[b, :-1])])
    for h in range(heads):
      a = dt[b, :, h] * A[h]
      for i in range(length):
        acc = D[h] * x[b, i, h]
        for j in range(i + 1):
          if doc[j] == doc[i]:
            w = C[b, i, h // rep] @ B[b, j, h // rep] * np.exp(a[j + 1:i + 1].sum())
            acc = acc + w * dt[b, j, h] * x[b, j, h]
        if doc[i] == 0:
          acc = acc + np.exp(a[:i + 1].sum()) * (h0[b, h] @ C[b, i, h // rep])
        y[b, i, h] = acc
  return y


# ----------------------------------------------------------------------------- the SSD scan


def test_reference_matches_numpy_float64_forms():
  x, dt, A, B, C, D, h0 = random_inputs(0, length=9)
  seg = random_segments(1, 2, 9)
  y_rec, f_rec = numpy_recurrence(x, dt, A, B, C, D, h0, seg)
  y_quad = numpy_quadratic(x, dt, A, B, C, D, h0, seg)
  assert rel(y_quad, y_rec) < 1e-12  # the two float64 forms of the paper agree
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (x, dt, A, B, C, D)]
    y, f = ssd(*args, initial_state=jnp.asarray(h0, jnp.float64), segment_ids=seg,
               impl="reference")
    assert y.dtype == jnp.float64
    assert rel(y, y_rec) < 1e-12 and rel(f, f_rec) < 1e-12
  y32, f32 = ssd(x, dt, A, B, C, D, initial_state=h0, segment_ids=seg, impl="reference")
  assert y32.dtype == jnp.float32 and f32.dtype == jnp.float32
  assert rel(y32, y_rec) < 1e-5 and rel(f32, f_rec) < 1e-5


def _loss_fn(impl, chunk_size, seg, wy, wf):
  def loss(x, dt, A, B, C, D, h0):
    y, f = ssd(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=h0, segment_ids=seg,
               impl=impl)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(f * wf)
  return loss


@functools.partial(jax.jit, static_argnums=(0, 2))
def _outputs_and_grads(impl, args, chunk_size, seg, wy, wf):
  y, f = ssd(*args[:6], chunk_size=chunk_size, initial_state=args[6], segment_ids=seg, impl=impl)
  grads = jax.grad(_loss_fn(impl, chunk_size, seg, wy, wf), argnums=tuple(range(7)))(*args)
  return y, f, grads


NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


@pytest.mark.parametrize("length", [32, 37, 5])  # multiple of the chunk, not, shorter than it
@pytest.mark.parametrize("packed", [False, True])
def test_xla_matches_float64_reference_float32(length, packed):
  chunk = 8
  args = random_inputs(2 + length, length=length)
  seg = random_segments(3, 2, length) if packed else None
  rng = np.random.default_rng(4)
  wy = rng.normal(size=args[0].shape).astype(np.float32)
  wf = rng.normal(size=args[6].shape).astype(np.float32)
  y, f, grads = _outputs_and_grads("xla", args, chunk, seg, wy, wf)
  y32, f32, grads32 = _outputs_and_grads("reference", args, chunk, seg, wy, wf)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    y64, f64, grads64 = _outputs_and_grads("reference", args64, chunk, seg, wy, wf)
    y64, f64, grads64 = jax.tree.map(np.asarray, (y64, f64, grads64))
  for out, ref in ((y, y64), (f, f64), (y32, y64), (f32, f64)):
    assert rel(out, ref) < 1e-5
  for name, g, g32, g64 in zip(NAMES, grads, grads32, grads64):
    assert g.dtype == jnp.float32
    assert rel(g, g64) < 1e-5, name
    assert rel(g32, g64) < 1e-5, name


@pytest.mark.parametrize("length", [32, 37])
def test_xla_matches_reference_bf16_inputs(length):
  args32 = random_inputs(5, length=length)
  args = [jnp.asarray(a, jnp.bfloat16) for a in args32]
  seg = random_segments(6, 2, length)
  rng = np.random.default_rng(7)
  # bf16-representable weights: the cotangent of the bf16 output is then exact.
  wy = np.asarray(jnp.asarray(rng.normal(size=args[0].shape), jnp.bfloat16), np.float32)
  wf = rng.normal(size=args[6].shape).astype(np.float32)
  with jax.enable_x64(True):  # float64 on the same (bf16-valued) inputs
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    float64 = _outputs_and_grads("reference", args64, 8, seg, wy, wf)
  # 5e-3 against float64 catches a gradient summed in bf16 (over the tokens for A: 5.6e-3 at
  # L = 37).
  check_bf16_against_float64(NAMES, _outputs_and_grads("xla", args, 8, seg, wy, wf),
                             _outputs_and_grads("reference", args, 8, seg, wy, wf), float64)


def test_chunk_size_and_auto_agree():
  x, dt, A, B, C, D, h0 = random_inputs(8, length=40)
  seg = random_segments(9, 2, 40)
  y_ref, f_ref = ssd(x, dt, A, B, C, D, initial_state=h0, segment_ids=seg, impl="reference")
  for chunk in (1, 3, 16, 64):
    y, f = ssd(x, dt, A, B, C, D, chunk_size=chunk, initial_state=h0, segment_ids=seg, impl="xla")
    assert rel(y, y_ref) < 1e-5 and rel(f, f_ref) < 1e-5, chunk
  y, f = ssd(x, dt, A, B, C, D, initial_state=h0, segment_ids=seg)
  assert rel(y, y_ref) < 1e-5 and rel(f, f_ref) < 1e-5


def test_strong_decay_is_stable():
  # sum of dt*A over a 64-token chunk reaches about -1e4: exp(cumsum_i) * exp(-cumsum_j) would
  # overflow; the segment sum must not.
  x, dt, A, B, C, D, h0 = random_inputs(10, batch=1, length=128, dt_range=(1.0, 20.0))
  y_ref, f_ref = ssd(x, dt, A, B, C, D, initial_state=h0, impl="reference")
  y, f = ssd(x, dt, A, B, C, D, chunk_size=64, initial_state=h0, impl="xla")
  assert rel(y, y_ref) < 1e-5 and rel(f, f_ref) < 1e-5
  g = jax.grad(lambda dt: jnp.sum(ssd(x, dt, A, B, C, D, chunk_size=64)[0]))(dt)
  g_ref = jax.grad(lambda dt: jnp.sum(ssd(x, dt, A, B, C, D, impl="reference")[0]))(dt)
  assert rel(g, g_ref) < 1e-5


def test_packed_equals_separate_runs():
  x, dt, A, B, C, D, h0 = random_inputs(11, batch=1, length=30)
  cut = 13
  seg = np.array([[4] * cut + [9] * (30 - cut)], np.int32)
  y, f = ssd(x, dt, A, B, C, D, chunk_size=8, initial_state=h0, segment_ids=seg)
  sl = lambda a, s: a[:, s]
  first = ssd(*(sl(a, slice(0, cut)) for a in (x, dt)), A,
              *(sl(a, slice(0, cut)) for a in (B, C)), D, chunk_size=8, initial_state=h0)
  second = ssd(*(sl(a, slice(cut, None)) for a in (x, dt)), A,
               *(sl(a, slice(cut, None)) for a in (B, C)), D, chunk_size=8)
  assert rel(y[:, :cut], first[0]) < 1e-5
  assert rel(y[:, cut:], second[0]) < 1e-5
  assert rel(f, second[1]) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_causal_by_gradient(impl):
  x, dt, A, B, C, D, h0 = random_inputs(12, batch=1, length=20)
  i = 11

  def out_i(x, dt, B, C):
    return jnp.sum(ssd(x, dt, A, B, C, D, chunk_size=8, initial_state=h0, impl=impl)[0][:, i])

  grads = jax.grad(out_i, argnums=(0, 1, 2, 3))(x, dt, B, C)
  for g in grads:
    g = np.asarray(g)
    assert np.all(g[:, i + 1:] == 0)
    assert np.abs(g[:, :i + 1]).sum() > 0


def test_bad_inputs_name_the_argument():
  x, dt, A, B, C, D, h0 = random_inputs(13, length=6)
  with pytest.raises(ValueError, match="dt"):
    ssd(x, dt[:, :5], A, B, C)
  with pytest.raises(ValueError, match="divisible"):
    ssd(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="initial_state"):
    ssd(x, dt, A, B, C, initial_state=h0[:, :2])
  with pytest.raises(ValueError, match="impl"):
    ssd(x, dt, A, B, C, impl="pallas9")
  with pytest.raises(ValueError, match="chunk_size"):
    ssd(x, dt, A, B, C, chunk_size=0, impl="xla")


# ----------------------------------------------------------------------------- the block

BLOCK = dict(d_model=16, d_state=8, expand=2, headdim=8, ngroups=2, chunk_size=8)


def block_and_params(seed=0, **kw):
  model = Mamba2(**{**BLOCK, **kw})
  u = jax.random.normal(jax.random.PRNGKey(seed), (2, 21, BLOCK["d_model"]))
  params = jax.jit(model.init)(jax.random.PRNGKey(seed + 1), u)
  # D starts at 1: move it so a wrong D path cannot hide.
  params["params"]["D"] = params["params"]["D"] + jax.random.normal(jax.random.PRNGKey(7), (4,))
  return jax.jit(model.apply), model, params, u


def test_block_init_matches_published():
  model = Mamba2(d_model=64, d_state=16, headdim=8)  # 16 heads
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4, 64)))["params"]
  a = np.exp(np.asarray(params["A_log"]))
  assert a.shape == (16,) and np.all((a >= 1) & (a <= 16)) and a.std() > 1
  dt = np.logaddexp(0.0, np.asarray(params["dt_bias"], np.float64))
  assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))
  assert np.ptp(np.log(dt)) > 1.5  # spread over the log range, not a constant
  assert np.all(np.asarray(params["D"]) == 1)
  assert set(Mamba2.ssm_param_names) <= set(params)
  assert params["in_proj"]["kernel"].shape == (64, 128 + 128 + 2 * 16 + 16)


def test_block_parallel_equals_streaming():
  apply, model, params, u = block_and_params(0)
  y_par, _ = apply(params, u)

  cache = model.init_cache(2, jnp.float32)
  ys = []
  for t in range(u.shape[1]):
    y_t, cache = apply(params, u[:, t:t + 1], cache=cache)
    ys.append(y_t)
  assert rel(jnp.concatenate(ys, 1), y_par) < 1e-5

  cache = model.init_cache(2, jnp.float32)
  y_pre, cache = apply(params, u[:, :13], cache=cache)
  ys = [y_pre]
  for t in range(13, u.shape[1]):
    y_t, cache = apply(params, u[:, t:t + 1], cache=cache)
    ys.append(y_t)
  assert rel(jnp.concatenate(ys, 1), y_par) < 1e-5
  assert cache["ssm"].dtype == jnp.float32


def test_block_packed_equals_separate_and_streams():
  apply, model, params, u = block_and_params(1)
  cut = 9
  seg = jnp.asarray(np.array([[0] * cut + [1] * (21 - cut), [5] * 21], np.int32))
  y, _ = apply(params, u, segment_ids=seg)
  y_a, _ = apply(params, u[:1, :cut])
  y_b, _ = apply(params, u[:1, cut:])
  y_c, _ = apply(params, u[1:])
  assert rel(y[:1, :cut], y_a) < 1e-5
  assert rel(y[:1, cut:], y_b) < 1e-5
  assert rel(y[1:], y_c) < 1e-5

  # Streaming in chunks of 5 tokens: the chunk [5, 10) straddles row 0's document change.
  cache = model.init_cache(2, jnp.float32)
  ys = []
  for s in range(0, 21, 5):
    y_t, cache = apply(params, u[:, s:s + 5], segment_ids=seg[:, s:s + 5], cache=cache)
    ys.append(y_t)
  assert rel(jnp.concatenate(ys, 1), y) < 1e-5

  # A chunk that opens a new document must drop the carried state (first id != cache's id).
  seg2 = jnp.asarray(np.array([[0] * 10 + [1] * 11] * 2, np.int32))
  y2, _ = apply(params, u, segment_ids=seg2)
  cache = model.init_cache(2, jnp.float32)
  y_first, cache = apply(params, u[:, :10], segment_ids=seg2[:, :10], cache=cache)
  y_second, cache = apply(params, u[:, 10:], segment_ids=seg2[:, 10:], cache=cache)
  assert rel(jnp.concatenate([y_first, y_second], 1), y2) < 1e-5
  assert np.all(np.asarray(cache["segment_id"]) == 1)


def test_block_causal_by_gradient():
  apply, model, params, u = block_and_params(2)
  i = 12
  g = jax.grad(lambda u: jnp.sum(apply(params, u)[0][:, i]))(u)
  g = np.asarray(g)
  assert np.all(g[:, i + 1:] == 0)
  assert np.abs(g[:, :i + 1]).sum() > 0


def test_block_bf16_close_to_float32():
  apply, model, params, u = block_and_params(3)
  y32, _ = apply(params, u)
  y16, _ = apply(params, u.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  # bf16 projections and activations (8-bit mantissa) through two matmuls and a norm.
  assert rel(y16, y32) < 3e-2


def test_block_bad_config_names_field():
  with pytest.raises(ValueError, match="headdim"):
    Mamba2(d_model=16, headdim=5).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 16)))
  with pytest.raises(ValueError, match="ngroups"):
    Mamba2(d_model=16, headdim=8, ngroups=3).init_cache(1, jnp.float32)


def test_sequence_parallel_equals_whole_sequence():
  # seq_axis: the short convolution's window from the left neighbour, ssd_local (scan the
  # shard from zero, then add the carried-in state); 4 shards, packed documents crossing shards.
  kwargs = dict(d_state=8, headdim=8, chunk_size=8)
  errors = sequence_parallel_errors({"causal": ("mamba2", kwargs)})["causal"]
  assert len(errors) == 5
  for key, err in errors.items():
    assert err < 1e-5, (key, err)
