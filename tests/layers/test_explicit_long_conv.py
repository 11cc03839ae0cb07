"""Tests for layers/explicit_long_conv.py: the squash and smooth regularisers by their definitions,
and the LongConv layer against a float64 numpy transcription of its equations, parallel ==
streaming, packing, causality and finite-difference gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from layers.explicit_long_conv import LongConv, smooth_average, smooth_frequency, squash
from tests.layers.mixer_testing import check_directional_derivatives, packed_equals_separate, stream
from tests.numerics import rel


def total_variation(k):
  """sum_i |k[i+1] - k[i]| over the taps (axis -2); k real or complex."""
  return float(np.sum(np.abs(np.diff(np.asarray(k), axis=-2))))


def test_squash_soft_thresholds():
  k = np.random.default_rng(0).normal(scale=0.01, size=(2, 50, 3)).astype(np.float32)
  out = np.asarray(squash(jnp.asarray(k), 0.005))
  small = np.abs(k) <= 0.005
  assert small.any() and (~small).any()
  assert np.all(out[small] == 0)
  np.testing.assert_allclose(out[~small], k[~small] - 0.005 * np.sign(k[~small]), atol=1e-9)


def test_smooth_average_is_a_zero_padded_moving_average():
  k = np.random.default_rng(1).normal(size=(2, 40, 3))
  out = np.asarray(smooth_average(jnp.asarray(k, jnp.float32), 5), np.float64)
  padded = np.pad(k, ((0, 0), (2, 2), (0, 0)))
  ref = np.stack([padded[:, i:i + 5].mean(axis=1) for i in range(40)], axis=1)
  assert rel(out, ref) < 1e-6
  assert total_variation(out) < 0.5 * total_variation(k)


def test_smooth_frequency_averages_neighbouring_frequencies():
  k = np.random.default_rng(2).normal(size=(1, 64, 2))
  out = np.asarray(smooth_frequency(jnp.asarray(k, jnp.float32), 3), np.float64)
  spectrum = np.fft.rfft(k, axis=1)
  g = np.exp(-0.5 * np.array([1.0, 0.0, 1.0]))
  g /= g.sum()
  padded = np.pad(spectrum, ((0, 0), (1, 1), (0, 0)))
  smoothed = g[0] * padded[:, :-2] + g[1] * padded[:, 1:-1] + g[2] * padded[:, 2:]
  assert rel(out, np.fft.irfft(smoothed, n=64, axis=1)) < 1e-5
  # Smoother spectrum, and the kernel's energy moves to small lags (and their circular images).
  out_spectrum = np.fft.rfft(out, axis=1)
  assert total_variation(out_spectrum) < 0.7 * total_variation(spectrum)
  energy = lambda a: np.sum(a[:, 16:48] ** 2) / np.sum(a ** 2)
  assert energy(out) < energy(k)


def gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def numpy_long_conv(params, x, *, bidirectional, lam, seg=None):
  """float64: y = GLU(Dense(gelu(k conv u + D u))) with k = squash(long_kernel), every kernel on
  every channel; convolution by loops, within documents when seg is given."""
  p = {k: np.asarray(v, np.float64) for k, v in params["params"].items() if k != "out_proj"}
  x = np.asarray(x, np.float64)
  batch, length, h = x.shape
  kern = np.sign(p["long_kernel"]) * np.maximum(np.abs(p["long_kernel"]) - lam, 0)
  c = p["D"].shape[0]
  seg = np.zeros((batch, length), int) if seg is None else seg
  y = np.zeros((batch, length, c, h))
  for b in range(batch):
    for t in range(length):
      for s in range(length):
        if seg[b, s] != seg[b, t]:
          continue
        if s <= t:
          y[b, t] += kern[:c, t - s] * x[b, s]
        elif bidirectional:
          y[b, t] += kern[c:, s - t - 1] * x[b, s]
  y = gelu(y + p["D"] * x[:, :, None]).reshape(batch, length, c * h)
  w = np.asarray(params["params"]["out_proj"]["kernel"], np.float64)
  z = y @ w + np.asarray(params["params"]["out_proj"]["bias"], np.float64)
  return z[..., :h] / (1 + np.exp(-z[..., h:]))


def make(seed=0, length=21, **kw):
  kw = dict(d_model=3, max_length=24, num_kernels=2, squash_lambda=0.05,
            kernel_init_scale=0.1) | kw
  m = LongConv(**kw)
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, length, 3)), jnp.float32)
  return m, m.init(jax.random.key(seed), x[:, :m.max_length]), x


apply = jax.jit(lambda m, p, x, seg, cache: m.apply(p, x, segment_ids=seg, cache=cache),
                static_argnums=0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_parallel_matches_numpy_transcription(bidirectional):
  m, p, x = make(bidirectional=bidirectional)
  seg = np.sort(np.random.default_rng(3).integers(0, 3, (2, 21)), axis=1).astype(np.int32)
  assert (np.asarray(p["params"]["long_kernel"]) == 0).mean() == 0
  y, cache = apply(m, p, x, None, None)
  assert cache is None
  assert rel(y, numpy_long_conv(p, x, bidirectional=bidirectional, lam=0.05)) < 1e-5
  # Packed documents: FFT path replaced by the direct convolution within documents.
  y, _ = apply(m, p, x, jnp.asarray(seg), None)
  assert rel(y, numpy_long_conv(p, x, bidirectional=bidirectional, lam=0.05, seg=seg)) < 1e-5


@pytest.mark.parametrize("smooth", ["average", "frequency"])
def test_parallel_equals_streaming(smooth):
  m, p, x = make(length=24, smooth=smooth, smooth_window=3)
  y, _ = apply(m, p, x, None, None)
  for sizes in ([1] * 24, [5, 1, 18], [24]):
    ys, cache = stream(apply, m, p, x, sizes)
    assert rel(ys, y) < 1e-5
    assert cache["inputs"].shape == (2, 23, 3)  # max_length - 1, whatever was streamed
  # Documents change inside and at the start of streamed chunks.
  seg = jnp.asarray(np.repeat([[0] * 7 + [1] * 10 + [4] * 7], 2, axis=0), jnp.int32)
  y, _ = apply(m, p, x, seg, None)
  ys, _ = stream(apply, m, p, x, [3, 4, 8, 9], segment_ids=seg)
  assert rel(ys, y) < 1e-5


def test_streaming_past_max_length_is_a_finite_filter():
  m, p, x = make(length=30, max_length=8, num_kernels=1)
  ys, cache = stream(apply, m, p, x, [4] * 7 + [2])
  # Each output sees only the last max_length inputs: the parallel form on that window.
  for t in (7, 16, 29):
    y, _ = apply(m, p, x[:, t - 7:t + 1], None, None)
    assert rel(ys[:, t], y[:, -1]) < 1e-5
  assert cache["inputs"].shape == (2, 7, 3)


def test_packed_equals_separate():
  m, p, x = make(length=20)
  packed_equals_separate(apply, m, p, x)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_causality_by_gradient(bidirectional):
  m, p, x = make(length=12, bidirectional=bidirectional, squash_lambda=0.0)
  one_doc = jnp.zeros((2, 12), jnp.int32)
  for seg in (None, one_doc):  # by FFT, and by the direct convolution
    jac = jax.jacrev(lambda x: apply(m, p, x, seg, None)[0][0, :, 0])(x)[:, 0]  # [t, s, H]
    jac = np.abs(np.asarray(jac)).sum(-1)
    future = jac[np.triu_indices(12, 1)]
    if bidirectional:
      assert future.min() > 1e-4 * jac.max()
    elif seg is None:
      assert future.max() < 1e-6 * jac.max()  # FFT round-off where the exact value is 0
    else:
      assert future.max() == 0


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    m, p, x = make(length=6, max_length=6, squash_lambda=0.0)
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    x64 = jnp.asarray(x, jnp.float64)
    g = jnp.asarray(np.random.default_rng(4).normal(size=x.shape))
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 2, jnp.int32)
    loss = lambda p, x: jnp.sum(g * m.apply(p, x, segment_ids=seg)[0])
    check_directional_derivatives(loss, p64, x64)


def test_kernel_dropout_zeroes_taps_and_rescales_the_rest():
  m, p, x = make(length=24, kernel_dropout=0.5, deterministic=False, squash_lambda=0.0)
  raw = p["params"]["long_kernel"]
  kept = np.asarray(m.apply(p, raw, method=LongConv.regularise,
                            rngs={"dropout": jax.random.key(1)}))
  raw = np.asarray(raw)
  dropped = kept == 0
  assert 0.35 < dropped.mean() < 0.65
  np.testing.assert_allclose(kept[~dropped], 2 * raw[~dropped], rtol=1e-6)


def test_bf16_inputs():
  m, p, x = make()
  y32, _ = apply(m, p, x, None, None)
  y16, _ = apply(m, p, x.astype(jnp.bfloat16), None, None)
  assert y16.dtype == jnp.bfloat16 and rel(y16, y32) < 1e-2


def test_errors_name_the_problem():
  m, p, x = make(length=24)
  with pytest.raises(ValueError, match="exceeds max_length 24"):
    m.apply(p, jnp.ones((1, 25, 3)))
  with pytest.raises(ValueError, match="cannot stream"):
    LongConv(d_model=3, bidirectional=True).init_cache(1)
  with pytest.raises(ValueError, match="smooth must be one of"):
    LongConv(d_model=3, max_length=8, smooth="gauss").init(jax.random.key(0), jnp.ones((1, 8, 3)))
  with pytest.raises(ValueError, match=r"needs x \[batch, length, 3\]"):
    m.apply(p, jnp.ones((1, 8, 4)))


def test_kernel_is_an_ssm_parameter():
  m, p, _ = make()
  assert set(LongConv.ssm_param_names) <= set(p["params"])



def test_sequence_parallel_on_two_shards_and_its_errors():
  # The comparison with the whole sequence on 4 shards, causal and bidirectional, packed or not,
  # runs with Hyena's in one subprocess (tests/layers/test_hyena.py). Here vmap with an axis name
  # binds the axis as shard_map would.
  m = LongConv(d_model=4, max_length=16, num_kernels=2, kernel_init_scale=0.1)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 4)), jnp.float32)
  p = jax.jit(m.init)(jax.random.key(0), x)
  sharded = m.clone(seq_axis="seq")
  run = jax.jit(jax.vmap(lambda x: sharded.apply(p, x)[0], axis_name="seq"))
  shards = lambda x, n: x.reshape(x.shape[0], n, -1, x.shape[2]).swapaxes(0, 1)
  y = run(shards(x, 2)).swapaxes(0, 1).reshape(x.shape)
  assert rel(y, apply(m, p, x, None, None)[0]) < 1e-5
  with pytest.raises(ValueError, match="sequence length 32 exceeds max_length 16"):
    run(jnp.ones((2, 1, 16, 4)))  # the whole length 2 x 16 counts, not the shard's 16
  with pytest.raises(ValueError, match="4 channels do not divide over the 3 shards"):
    run(shards(x[:, :12], 3))
  with pytest.raises(ValueError, match="streaming .cache. and seq_axis do not combine"):
    sharded.apply(p, x[:, :1], cache=m.init_cache(2))
