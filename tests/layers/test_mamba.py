"""Tests for layers/mamba.py: the selective scan against a float64 numpy recurrence and across
implementations, its memory at long length, and the Mamba block's parallel / streaming forms."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.mamba import Mamba, selective_scan
from tests.layers.sequence_parallel_check import sequence_parallel_errors
from tests.numerics import rel


def scan_inputs(seed, batch, length, channels, state, layout, dtype=jnp.float32):
  """Random selective-scan arguments (fresh per seed); B/C layout "shared" | "groups" | "lti"."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  if layout == "shared":
    bc_shape = (batch, length, state)
  elif layout == "groups":
    bc_shape = (batch, length, 2, state)
  else:
    bc_shape = (channels, state)
  args = dict(
      u=normal(batch, length, channels), delta=normal(batch, length, channels) - 1.0,
      A=-np.exp(rng.uniform(-1, 1.5, (channels, state))).astype(np.float32),
      B=normal(*bc_shape), C=normal(*bc_shape), D=normal(channels),
      z=normal(batch, length, channels), delta_bias=0.5 * normal(channels),
      initial_state=normal(batch, channels, state))
  return {k: jnp.asarray(v, dtype) for k, v in args.items()}


def numpy_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids):
  """float64 loop over tokens, channels and states, written from the paper's equations."""
  u, delta, A, B, C, D, z, delta_bias, h = (np.asarray(x, np.float64) for x in (
      u, delta, A, B, C, D, z, delta_bias, initial_state))
  batch, length, channels = u.shape
  state = A.shape[1]
  if B.ndim == 3:  # shared by the channels: one group
    B, C = B[:, :, None], C[:, :, None]
  lti = B.ndim == 2  # [channels, state], the same for every token
  y = np.zeros_like(u)
  h = h.copy()
  for b in range(batch):
    for t in range(length):
      if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
        h[b] = 0.0
      for d in range(channels):
        dt = np.log1p(np.exp(delta[b, t, d] + delta_bias[d]))
        g = 0 if lti else d // (channels // B.shape[2])
        acc = 0.0
        for n in range(state):
          b_n = B[d, n] if lti else B[b, t, g, n]
          c_n = C[d, n] if lti else C[b, t, g, n]
          h[b, d, n] = np.exp(dt * A[d, n]) * h[b, d, n] + dt * b_n * u[b, t, d]
          acc += c_n * h[b, d, n]
        out = acc + D[d] * u[b, t, d]
        y[b, t, d] = out * z[b, t, d] / (1.0 + np.exp(-z[b, t, d]))
  return y, h


# ----------------------------------------------------------------------------- selective_scan


@pytest.mark.parametrize("layout", ["shared", "groups", "lti"])
def test_reference_matches_float64_numpy_recurrence(layout):
  batch, length, channels, state = 2, 9, 4, 3
  args = scan_inputs(0, batch, length, channels, state, layout)
  seg = np.array([[0] * 4 + [1] * 5, [3] * 2 + [5] * 3 + [6] * 4], np.int32)
  y, h = selective_scan(**args, delta_softplus=True, segment_ids=seg, impl="reference")
  y_np, h_np = numpy_selective_scan(*(args[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                        "delta_bias", "initial_state")), seg)
  # float32 arithmetic over 9 tokens against float64: a few ulps.
  assert rel(y, y_np) < 1e-5
  assert rel(h, h_np) < 1e-5


GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_scan(impl, args, seg=None, chunk_size=8):
  """(y, final state) and the gradients of a random projection of both w.r.t. every input."""
  rng = np.random.default_rng(123)
  y_shape = args["u"].shape
  h_shape = args["initial_state"].shape
  wy = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
  wh = jnp.asarray(rng.standard_normal(h_shape), jnp.float32)

  def loss(diff):
    y, h = selective_scan(**diff, delta_softplus=True, segment_ids=seg, impl=impl,
                          chunk_size=chunk_size)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh), (y, h)

  diff = {k: args[k] for k in GRAD_ARGS}
  grads, (y, h) = jax.jit(jax.grad(loss, has_aux=True))(diff)
  return y, h, grads


@pytest.mark.parametrize("layout", ["shared", "groups", "lti"])
@pytest.mark.parametrize("length", [32, 37])
def test_xla_matches_reference_float32(layout, length):
  args = scan_inputs(length, 2, length, 4, 3, layout)
  seg = np.repeat(np.arange(length)[None] // 13, 2, 0).astype(np.int32)  # resets mid-chunk
  y_r, h_r, g_r = run_scan("reference", args, seg)
  y_x, h_x, g_x = run_scan("xla", args, seg)
  assert rel(y_x, y_r) < 1e-5
  assert rel(h_x, h_r) < 1e-5
  for k in GRAD_ARGS:
    assert rel(g_x[k], g_r[k]) < 1e-5, k


@pytest.mark.parametrize("length", [32, 37])
def test_xla_matches_reference_bfloat16(length):
  args = scan_inputs(7 + length, 2, length, 4, 3, "groups", dtype=jnp.bfloat16)
  y_r, h_r, g_r = run_scan("reference", args)
  y_x, h_x, g_x = run_scan("xla", args)
  assert y_x.dtype == jnp.bfloat16 and h_x.dtype == jnp.float32
  # Both compute in float32 from the same bf16 inputs; the bf16 rounding of the outputs and of
  # the input gradients is what differs (about 2^-8 relative).
  assert rel(y_x, y_r) < 1e-2
  assert rel(h_x, h_r) < 1e-2
  for k in GRAD_ARGS:
    assert rel(g_x[k], g_r[k]) < 1e-2, k
  # And the reference itself on bf16 inputs stays near the float32 computation on them.
  args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
  y_32, _, _ = run_scan("reference", args32)
  assert rel(y_r, y_32) < 1e-2


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_segments_equal_separate_runs(impl):
  args = scan_inputs(3, 1, 21, 4, 3, "shared")
  del args["initial_state"]
  cut = 12
  seg = np.array([[4] * cut + [9] * (21 - cut)], np.int32)
  y, _ = selective_scan(**args, delta_softplus=True, segment_ids=seg, impl=impl, chunk_size=8)
  sl = lambda v, s: v[:, s] if v.ndim == 3 and v.shape[1] == 21 else v
  parts = []
  for s in (slice(0, cut), slice(cut, 21)):
    part = {k: sl(v, s) for k, v in args.items()}
    parts.append(selective_scan(**part, delta_softplus=True, impl=impl, chunk_size=8)[0])
  assert rel(y, jnp.concatenate(parts, axis=1)) < 1e-6


def test_initial_state_chains_chunks():
  args = scan_inputs(5, 2, 30, 4, 3, "groups")
  y, h = selective_scan(**args, delta_softplus=True, impl="xla", chunk_size=8)
  first = {k: (v[:, :11] if v.ndim >= 3 and v.shape[1] == 30 else v) for k, v in args.items()}
  second = {k: (v[:, 11:] if v.ndim >= 3 and v.shape[1] == 30 else v) for k, v in args.items()}
  y1, h1 = selective_scan(**first, delta_softplus=True, impl="xla", chunk_size=8)
  second["initial_state"] = h1
  y2, h2 = selective_scan(**second, delta_softplus=True, impl="xla", chunk_size=8)
  assert rel(jnp.concatenate([y1, y2], axis=1), y) < 1e-6
  assert rel(h2, h) < 1e-6


def test_xla_memory_is_linear_in_length_with_small_constant():
  # Lowered and compiled only: a [1, L, D, N] float32 state tensor would be L*D*N*4 = 2 GiB.
  length, channels, state = 32768, 1024, 16
  full_state_bytes = length * channels * state * 4
  spec = jax.ShapeDtypeStruct
  args = (spec((1, length, channels), jnp.float32), spec((1, length, channels), jnp.float32),
          spec((channels, state), jnp.float32), spec((1, length, state), jnp.float32),
          spec((1, length, state), jnp.float32))

  def f(u, delta, A, B, C):
    return selective_scan(u, delta, A, B, C, delta_softplus=True, impl="xla")

  def loss(*a):
    y, h = f(*a)
    return jnp.sum(y) + jnp.sum(h)

  fwd = jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
  bwd = bwd.memory_analysis().temp_size_in_bytes
  # Measured on CPU (jax 0.10): forward 384 MiB (3 [L, D] float32 buffers), forward+backward
  # 548 MiB; both O(L*D), a fraction of the 2 GiB a materialised state would need.
  assert fwd < full_state_bytes / 4, fwd
  assert bwd < full_state_bytes / 3, bwd


def test_bad_arguments_name_the_argument():
  args = scan_inputs(0, 1, 8, 4, 3, "shared")
  with pytest.raises(ValueError, match="groups"):
    selective_scan(args["u"], args["delta"], args["A"], jnp.ones((1, 8, 3, 3)), args["C"])
  with pytest.raises(ValueError, match="delta has shape"):
    selective_scan(args["u"], args["delta"][:, :4], args["A"], args["B"], args["C"])
  with pytest.raises(ValueError, match="impl"):
    selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], impl="cuda")
  with pytest.raises(ValueError, match="segment_ids"):
    selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"],
                   segment_ids=np.zeros((1, 7), np.int32))


# ----------------------------------------------------------------------------- Mamba block


class Jitted:
  """mixer.apply under jax.jit (op-by-op dispatch dominates these tiny shapes otherwise)."""

  def __init__(self, mixer):
    self.mixer = mixer
    self.apply = jax.jit(lambda p, x, segment_ids=None, cache=None: mixer.apply(
        p, x, segment_ids=segment_ids, cache=cache))

  def init_cache(self, batch_size, dtype):
    return self.mixer.init_cache(batch_size, dtype)


def block_setup(seed, d_model=8, batch=2, length=11, **kw):
  """A (jitted) Mamba block, its parameters moved off the init (so A_log, D, dt are generic)
  and x."""
  mixer = Mamba(d_model=d_model, d_state=4, chunk_size=4, **kw)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, length, d_model)), jnp.float32)
  params = mixer.init(jax.random.PRNGKey(seed), x)
  params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32),
                        params)
  return Jitted(mixer), params, x


def numpy_mamba(p, x, segment_ids):
  """float64 forward of the block from its parameters, written from the Mamba reference."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p["params"])
  x = np.asarray(x, np.float64)
  d_inner = p["D"].shape[0]
  n = p["A_log"].shape[1]
  r = p["dt_proj"]["kernel"].shape[0]
  xz = x @ p["in_proj"]["kernel"]
  xs, z = xz[..., :d_inner], xz[..., d_inner:]
  kernel = p["conv1d"]["kernel"]  # [K, d_inner], kernel[K-1] on the current token
  k = kernel.shape[0]
  conv = np.zeros_like(xs) + p["conv1d"]["bias"]
  for t in range(xs.shape[1]):
    for j in range(k):
      s = t - (k - 1) + j
      if s >= 0:
        same = (segment_ids[:, s] == segment_ids[:, t])[:, None]
        conv[:, t] += same * kernel[j] * xs[:, s]
  xs = conv / (1.0 + np.exp(-conv))
  dbc = xs @ p["x_proj"]["kernel"]
  dt = dbc[..., :r] @ p["dt_proj"]["kernel"]
  B, C = dbc[..., r:r + n][:, :, None], dbc[..., r + n:][:, :, None]
  y, _ = numpy_selective_scan(xs, dt, -np.exp(p["A_log"]), B, C, p["D"], z, p["dt_bias"],
                              np.zeros((x.shape[0], d_inner, n)), segment_ids)
  return y @ p["out_proj"]["kernel"]


def test_mamba_init_matches_published_init():
  mixer = Mamba(d_model=40, d_state=6)
  params = mixer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 40)))["params"]
  d_inner = 80
  assert params["in_proj"]["kernel"].shape == (40, 2 * d_inner)
  assert params["dt_proj"]["kernel"].shape == (3, d_inner)  # dt_rank = ceil(40 / 16)
  assert params["x_proj"]["kernel"].shape == (d_inner, 3 + 2 * 6)
  np.testing.assert_allclose(np.exp(params["A_log"]), np.tile(np.arange(1, 7), (d_inner, 1)),
                             rtol=1e-6)
  np.testing.assert_array_equal(params["D"], np.ones(d_inner))
  dt = np.log1p(np.exp(np.asarray(params["dt_bias"], np.float64)))
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
  # log-uniform: log dt spread over the whole [log 1e-3, log 0.1] range, not clustered.
  assert np.log(dt).min() < np.log(1e-3) + 1.0 and np.log(dt).max() > np.log(0.1) - 1.0
  bound = 3 ** -0.5
  w = np.asarray(params["dt_proj"]["kernel"])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.5 * bound
  assert Mamba.ssm_param_names == ("A_log", "D", "dt_bias")
  assert set(Mamba.ssm_param_names) <= set(params)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_mamba_matches_float64_numpy_block(impl):
  mixer, params, x = block_setup(1, scan_impl=impl)
  seg = np.array([[0] * 5 + [1] * 6, [2] * 11], np.int32)
  y, cache = mixer.apply(params, x, segment_ids=seg)
  assert cache is None
  assert rel(y, numpy_mamba(params, x, seg)) < 1e-5


def test_mamba_parallel_equals_streaming():
  mixer, params, x = block_setup(2)
  length = x.shape[1]
  y_par, _ = mixer.apply(params, x)
  # Token by token.
  cache = mixer.init_cache(x.shape[0], jnp.float32)
  ys = []
  for t in range(length):
    y_t, cache = mixer.apply(params, x[:, t:t + 1], cache=cache)
    ys.append(y_t)
  assert rel(jnp.concatenate(ys, axis=1), y_par) < 1e-5
  # Chunked prefill (7 tokens, not a multiple of the scan chunk), then token by token.
  cache = mixer.init_cache(x.shape[0], jnp.float32)
  y_pre, cache = mixer.apply(params, x[:, :7], cache=cache)
  ys = [y_pre]
  for t in range(7, length):
    y_t, cache = mixer.apply(params, x[:, t:t + 1], cache=cache)
    ys.append(y_t)
  assert rel(jnp.concatenate(ys, axis=1), y_par) < 1e-5


def test_mamba_packed_segments_equal_separate_runs():
  mixer, params, x = block_setup(3, batch=1, length=13)
  cut = 6
  seg = np.array([[1] * cut + [2] * (13 - cut)], np.int32)
  y, _ = mixer.apply(params, x, segment_ids=seg)
  y_sep = jnp.concatenate([mixer.apply(params, x[:, :cut])[0],
                           mixer.apply(params, x[:, cut:])[0]], axis=1)
  assert rel(y, y_sep) < 1e-6
  # Streaming: a chunk starting a new document must not see the cached one.
  cache = mixer.init_cache(1, jnp.float32)
  y1, cache = mixer.apply(params, x[:, :cut], segment_ids=seg[:, :cut], cache=cache)
  y2, cache = mixer.apply(params, x[:, cut:], segment_ids=seg[:, cut:], cache=cache)
  assert rel(jnp.concatenate([y1, y2], axis=1), y_sep) < 1e-6
  # And a streamed chunk that itself straddles the boundary.
  cache = mixer.init_cache(1, jnp.float32)
  y3, cache = mixer.apply(params, x[:, :4], segment_ids=seg[:, :4], cache=cache)
  y4, cache = mixer.apply(params, x[:, 4:], segment_ids=seg[:, 4:], cache=cache)
  assert rel(jnp.concatenate([y3, y4], axis=1), y_sep) < 1e-6


def test_mamba_is_causal():
  mixer, params, x = block_setup(4, batch=1, length=10)
  t = 4
  grad = jax.grad(lambda x: jnp.sum(mixer.apply(params, x)[0][:, t]))(x)
  grad = np.abs(np.asarray(grad[0])).sum(-1)
  assert np.all(grad[t + 1:] == 0.0)
  assert np.all(grad[:t + 1] > 0.0)


def test_mamba_gradients_xla_match_reference():
  mixer_r, params, x = block_setup(5, scan_impl="reference")
  mixer_x = Jitted(Mamba(d_model=8, d_state=4, chunk_size=4, scan_impl="xla"))
  loss = lambda m: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)[0])),
                                    argnums=(0, 1)))
  g_r = loss(mixer_r)(params, x)
  g_x = loss(mixer_x)(params, x)
  for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_r)):
    assert rel(a, b) < 1e-5


def test_mamba_bad_input_names_the_field():
  with pytest.raises(ValueError, match="d_model=8"):
    Mamba(d_model=8).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 6)))


def test_sequence_parallel_equals_whole_sequence():
  # seq_axis: the short convolution's window from the left neighbour, selective_scan_local (scan the
  # shard from zero, then add the carried-in state); 4 shards, packed documents crossing shards.
  errors = sequence_parallel_errors({"causal": ("mamba", dict(d_state=4))})["causal"]
  assert len(errors) == 5
  for key, err in errors.items():
    assert err < 1e-5, (key, err)
