"""Tests for layers/hyena.py: the positional encoding and decay window by their definitions, the
operator against a float64 numpy transcription of the paper's recurrence, parallel == streaming,
packing, causality and finite-difference gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.hyena import Hyena, decay_window, positional_encoding
from tests.layers.mixer_testing import check_directional_derivatives, packed_equals_separate, stream
from tests.numerics import rel


def test_positional_encoding_values():
  pe = positional_encoding(6, 10, 5)  # time + 2 bands, frequencies 1e-4 and 1
  t = np.arange(6)
  np.testing.assert_allclose(pe[:, 0], t / 9, rtol=1e-6)
  np.testing.assert_allclose(pe[:, 2], np.cos(2 * math.pi * t / 10), atol=1e-6)
  np.testing.assert_allclose(pe[:, 4], -np.sin(2 * math.pi * t / 10), atol=1e-6)
  np.testing.assert_allclose(pe[:, 1], np.cos(1e-4 * 2 * math.pi * t / 10), atol=1e-6)
  # Tap t has the same encoding whatever the sequence length: only max_length sets the grid.
  np.testing.assert_array_equal(positional_encoding(10, 10, 5)[:6], pe)
  with pytest.raises(ValueError, match="emb_dim must be odd"):
    positional_encoding(6, 10, 4)


def test_decay_window_reaches_the_target_at_the_set_fraction():
  w = decay_window(101, 101, 3, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2)
  assert np.all(w[0] == 1) and np.all(np.diff(w, axis=0) < 0)
  assert w[30, 0] == pytest.approx(1e-2, rel=1e-5)   # fastest channel: 1e-2 after 30% of taps
  assert w[100, 2] == pytest.approx(1e-2 ** (1 / 1.5), rel=1e-5)  # slowest: after 150%


def numpy_hyena(params, x, order, max_length, emb_dim, seg=None):
  """float64 transcription of Definition 3.1: streams from in_proj and a causal short conv,
  z^1 = v, z^{n+1} = x^n * (h^n conv z^n + b^n z^n), y = out_proj(z^{N+1}); convolutions by loops,
  within documents when seg is given."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x = np.asarray(x, np.float64)
  batch, length, d = x.shape
  seg = np.zeros((batch, length), int) if seg is None else seg
  u = x @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
  ksz = p["short_conv"]["kernel"].shape[0]
  conv = np.zeros_like(u) + p["short_conv"]["bias"]
  for t in range(length):
    for j in range(ksz):  # kernel[ksz-1] weighs the current token
      s = t - (ksz - 1) + j
      if s >= 0:
        conv[:, t] += p["short_conv"]["kernel"][j] * u[:, s] * (seg[:, s] == seg[:, t])[:, None]
  streams = conv.reshape(batch, length, order + 1, d)
  # The implicit filters: FFN with sine activations over [t/(L-1), cos(f w), -sin(f w)].
  f = p["implicit_filter"]
  bands = (emb_dim - 1) // 2
  tt = np.arange(length)
  w = 2 * math.pi * tt / max_length
  freqs = np.linspace(1e-4, bands - 1, bands)
  z = np.concatenate([(tt / (max_length - 1))[:, None], np.cos(np.outer(w, freqs)),
                      -np.sin(np.outer(w, freqs))], axis=1)
  i = 0
  while f"dense_{i}" in f:
    z = np.sin(f[f"sine_{i}"]["freq"] * (z @ f[f"dense_{i}"]["kernel"] + f[f"dense_{i}"]["bias"]))
    i += 1
  h = z @ f["dense_out"]["kernel"]
  rate = np.linspace(math.log(1e-2) / 0.3, math.log(1e-2) / 1.5, order * d)
  h = (h * np.exp(-np.abs(rate) * (tt / (max_length - 1))[:, None])).reshape(length, order, d)
  v = streams[:, :, order]
  for n in range(order):
    hv = np.zeros_like(v)
    for t in range(length):
      for s in range(t + 1):
        hv[:, t] += h[t - s, n] * v[:, s] * (seg[:, s] == seg[:, t])[:, None]
    v = streams[:, :, n] * (hv + f["bias"][n] * v)
  return v @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


def make(seed=0, length=19, **kw):
  kw = dict(d_model=4, max_length=24, order=3, filter_order=8, emb_dim=5) | kw
  m = Hyena(**kw)
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, length, 4)), jnp.float32)
  return m, m.init(jax.random.key(seed), x[:, :m.max_length]), x


apply = jax.jit(lambda m, p, x, seg, cache: m.apply(p, x, segment_ids=seg, cache=cache),
                static_argnums=0)


@pytest.mark.parametrize("order", [1, 3])
def test_parallel_matches_numpy_transcription(order):
  m, p, x = make(order=order)
  y, cache = apply(m, p, x, None, None)
  assert cache is None
  assert rel(y, numpy_hyena(p, x, order, 24, 5)) < 1e-5
  seg = np.sort(np.random.default_rng(1).integers(0, 3, (2, 19)), axis=1).astype(np.int32)
  y, _ = apply(m, p, x, jnp.asarray(seg), None)
  assert rel(y, numpy_hyena(p, x, order, 24, 5, seg=seg)) < 1e-5


def test_parallel_equals_streaming():
  m, p, x = make(length=24)
  y, _ = apply(m, p, x, None, None)
  for sizes in ([1] * 24, [5, 1, 18], [24]):
    ys, cache = stream(apply, m, p, x, sizes)
    assert rel(ys, y) < 1e-5
    assert cache["inputs"].shape == (2, 23, 3, 4)
  seg = jnp.asarray(np.repeat([[0] * 7 + [1] * 10 + [4] * 7], 2, axis=0), jnp.int32)
  y, _ = apply(m, p, x, seg, None)
  ys, _ = stream(apply, m, p, x, [3, 4, 8, 9], segment_ids=seg)
  assert rel(ys, y) < 1e-5


def test_packed_equals_separate():
  m, p, x = make(length=20)
  packed_equals_separate(apply, m, p, x)


def test_causality_by_gradient():
  m, p, x = make(length=12)
  for seg in (None, jnp.zeros((2, 12), jnp.int32)):  # by FFT, and by the direct convolution
    jac = jax.jacrev(lambda x: apply(m, p, x, seg, None)[0][0, :, 0])(x)[:, 0]  # [t, s, D]
    jac = np.abs(np.asarray(jac)).sum(-1)
    future = jac[np.triu_indices(12, 1)]
    assert future.max() <= (1e-6 * jac.max() if seg is None else 0)
    assert np.diag(jac).min() > 0


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    m, p, x = make(length=6, max_length=6, order=2)
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    x64 = jnp.asarray(x, jnp.float64)
    g = jnp.asarray(np.random.default_rng(4).normal(size=x.shape))
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 2, jnp.int32)
    loss = lambda p, x: jnp.sum(g * m.apply(p, x, segment_ids=seg)[0])
    check_directional_derivatives(loss, p64, x64)


def test_bf16_inputs():
  m, p, x = make()
  y32, _ = apply(m, p, x, None, None)
  y16, _ = apply(m, p, x.astype(jnp.bfloat16), None, None)
  assert y16.dtype == jnp.bfloat16 and rel(y16, y32) < 2e-2


def test_errors_name_the_problem():
  m, p, _ = make()
  with pytest.raises(ValueError, match="exceeds max_length 24"):
    m.apply(p, jnp.ones((1, 25, 4)))
  with pytest.raises(ValueError, match=r"needs x \[batch, length, 4\]"):
    m.apply(p, jnp.ones((1, 8, 3)))


def test_filter_parameters_are_tagged_for_the_ssm_group():
  m, p, _ = make()
  # The trainer puts every parameter under a submodule named in ssm_param_names in the SSM group.
  assert Hyena.ssm_param_names == ("implicit_filter",)
  assert {"dense_0", "dense_out", "sine_0", "bias"} <= set(p["params"]["implicit_filter"])


def test_sequence_parallel_equals_whole_sequence():
  # One subprocess for the long-convolution family: LongConv (causal with two kernels, and
  # bidirectional) and Hyena, on 4 shards of 8 tokens (and seq=2 x data=2), FFT and packed paths.
  from tests.layers.sequence_parallel_check import sequence_parallel_errors
  errors = sequence_parallel_errors({
      "long_conv_causal": ("long_conv", dict(max_length=32, num_kernels=2)),
      "long_conv_bidirectional": ("long_conv", dict(max_length=32, bidirectional=True,
                                                    smooth="frequency", smooth_window=3)),
      "hyena_order_2": ("hyena", dict(max_length=32, order=2, filter_order=8)),
  })
  assert len(errors) == 3
  for label, errs in errors.items():
    for key, err in errs.items():
      assert err < 1e-5, (label, key, err)


def test_sequence_parallel_errors_name_the_problem():
  sharded = Hyena(d_model=4, max_length=12, filter_order=8, seq_axis="seq")
  init = lambda x, **kw: sharded.init(jax.random.key(0), x, **kw)
  # The whole length, 2 shards x 8 tokens, must fit max_length (vmap binds the axis name).
  with pytest.raises(ValueError, match="sequence length 16 exceeds max_length 12"):
    jax.vmap(init, axis_name="seq")(jnp.ones((2, 1, 8, 4)))
  with pytest.raises(ValueError, match="streaming .cache. and seq_axis do not combine"):
    init(jnp.ones((1, 1, 4)), cache=sharded.init_cache(1))
