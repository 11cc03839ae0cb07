"""Tests for layers/blocks.py against float64 numpy formulas and explicit compositions."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from layers import blocks
from layers.blocks import (GatedMLP, LayerNorm, ResidualBlock, RMSNorm, ShortConv, apply_rope,
                           get_mixer, mixer_names, register_mixer)
from layers.s4d import S4D
from tests.layers import mixer_testing
from tests.numerics import rel


def randn(seed, shape, scale=1.0):
  # numpy, not jax.random: each new shape would compile a threefry program (~1 s on this CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def randomize(params, seed):
  """Replace every parameter with fresh random values (so scales/biases are not 1/0)."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(
      treedef, [randn(seed + i, leaf.shape, 0.5) + (1.0 if leaf.ndim == 1 else 0.0)
                for i, leaf in enumerate(leaves)])


def check_directional_grad(f_jax, f_np, args, seed=0, eps=1e-4, tol=1e-4):
  """<grad f_jax(args), v> against a float64 central difference of f_np along v, for
  f = sum(out * cotangent). The difference has O(eps^2) ~ 1e-8 error; the float32 gradient
  is compared at 1e-4 because it sums many float32 products."""
  # Seeds far from the ones used for inputs: a direction parallel to x would be a blind spot
  # (LayerNorm is invariant to scaling x).
  cot = np.asarray(randn(seed + 1000, np.shape(f_np(*[np.asarray(a, np.float64) for a in args]))))
  vs = [np.asarray(randn(seed + 1001 + i, np.shape(a)), np.float64) for i, a in enumerate(args)]
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f_jax(*a) * cot),
                           argnums=tuple(range(len(args)))))(*args)
  a64 = [np.asarray(a, np.float64) for a in args]
  plus = np.sum(f_np(*[a + eps * v for a, v in zip(a64, vs)]) * cot)
  minus = np.sum(f_np(*[a - eps * v for a, v in zip(a64, vs)]) * cot)
  numeric = (plus - minus) / (2 * eps)
  analytic = sum(float(np.sum(np.asarray(g, np.float64) * v)) for g, v in zip(grads, vs))
  assert abs(analytic - numeric) <= tol * max(abs(numeric), 1e-3), (analytic, numeric)


# ------------------------------------------------------------------------------------- norms


def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * scale


def np_layer(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_rmsnorm_matches_numpy():
  x = randn(0, (2, 5, 8), 3.0)
  norm = RMSNorm(eps=1e-6)
  params = randomize(norm.init(jax.random.key(0), x), 10)
  scale = np.asarray(params["params"]["scale"], np.float64)
  y = norm.apply(params, x)
  assert rel(y, np_rms(np.asarray(x, np.float64), scale, 1e-6)) < 1e-6
  check_directional_grad(lambda xx: norm.apply(params, xx),
                         lambda xx: np_rms(xx, scale, 1e-6), [x])
  y16 = norm.apply(params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16 and rel(y16, y) < 1e-2


def test_layernorm_matches_numpy():
  x = randn(1, (2, 5, 8), 3.0) + 2.0
  norm = LayerNorm(eps=1e-5)
  params = randomize(norm.init(jax.random.key(0), x), 20)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  y = norm.apply(params, x)
  assert rel(y, np_layer(np.asarray(x, np.float64), p["scale"], p["bias"], 1e-5)) < 1e-6
  check_directional_grad(lambda xx: norm.apply(params, xx),
                         lambda xx: np_layer(xx, p["scale"], p["bias"], 1e-5), [x])
  y16 = norm.apply(params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16 and rel(y16, y) < 1e-2


# --------------------------------------------------------------------------------- gated MLP


def np_gated_mlp(x, p, activation):
  h1, h3 = x @ p["w1"]["kernel"], x @ p["w3"]["kernel"]
  act = h1 / (1 + np.exp(-h1)) if activation == "swiglu" else 0.5 * h1 * (1 + erf(h1 / 2 ** 0.5))
  return (act * h3) @ p["w2"]["kernel"]


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_mlp_matches_numpy(activation):
  x = randn(2, (2, 4, 6))
  mlp = GatedMLP(hidden_dim=10, activation=activation)
  params = mlp.init(jax.random.key(1), x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  assert p["w1"]["kernel"].shape == (6, 10) and p["w2"]["kernel"].shape == (10, 6)
  y = mlp.apply(params, x)
  assert rel(y, np_gated_mlp(np.asarray(x, np.float64), p, activation)) < 1e-5
  check_directional_grad(lambda xx: mlp.apply(params, xx),
                         lambda xx: np_gated_mlp(xx, p, activation), [x])


def test_gated_mlp_errors_and_dropout():
  x = randn(3, (2, 4, 6))
  with pytest.raises(ValueError, match="GatedMLP.activation='relu'"):
    GatedMLP(hidden_dim=4, activation="relu").init(jax.random.key(0), x)
  mlp = GatedMLP(hidden_dim=8, dropout=0.5, deterministic=False)
  params = mlp.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
  y1 = mlp.apply(params, x, rngs={"dropout": jax.random.key(2)})
  y2 = mlp.apply(params, x, rngs={"dropout": jax.random.key(3)})
  assert rel(y1, y2) > 1e-2
  assert rel(GatedMLP(hidden_dim=8, dropout=0.5).apply(params, x),
             GatedMLP(hidden_dim=8).apply(params, x)) == 0.0


# -------------------------------------------------------------------------------------- rope


def np_rope(x, positions, base=10000.0):
  """Explicit complex rotation: z_i = x_i + 1j x_{i+h} times exp(1j pos base^(-2i/d))."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  h = d // 2
  pos = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:2])
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(h):
        z = (x[b, t, :, i] + 1j * x[b, t, :, i + h]) * np.exp(1j * pos[b, t] * base ** (-2 * i / d))
        out[b, t, :, i], out[b, t, :, i + h] = z.real, z.imag
  return out


def test_rope_matches_complex_rotation_reference():
  x = randn(4, (2, 6, 3, 8))
  pos = jnp.asarray([[0, 1, 2, 3, 4, 5], [7, 3, 100, 2000, 5, 6]], jnp.int32)
  y = apply_rope(x, pos)
  assert rel(y, np_rope(x, pos)) < 1e-5
  # positions [length] broadcast over the batch; another base.
  y_shared = apply_rope(x, jnp.arange(6) + 3, base=500.0)
  assert rel(y_shared, np_rope(x, np.arange(6) + 3, 500.0)) < 1e-5
  check_directional_grad(lambda xx: apply_rope(xx, pos), lambda xx: np_rope(xx, pos), [x])
  y16 = apply_rope(x.astype(jnp.bfloat16), pos)
  assert y16.dtype == jnp.bfloat16 and rel(y16, y) < 1e-2


def test_rope_preserves_norm_and_depends_on_relative_position():
  q, k = randn(5, (1, 1, 2, 16)), randn(6, (1, 1, 2, 16))
  rot = lambda x, p: apply_rope(x, jnp.asarray([p], jnp.float32))[0, 0]
  np.testing.assert_allclose(np.linalg.norm(rot(q, 37.0), axis=-1),
                             np.linalg.norm(q[0, 0], axis=-1), rtol=1e-6)
  dots = [float(jnp.sum(rot(q, m)[0] * rot(k, n)[0])) for m, n in [(5, 2), (13, 10), (103, 100)]]
  np.testing.assert_allclose(dots[1:], [dots[0]] * 2, rtol=1e-4)
  assert abs(float(jnp.sum(rot(q, 6)[0] * rot(k, 2)[0])) - dots[0]) > 1e-3 * abs(dots[0])


def test_rope_errors():
  with pytest.raises(ValueError, match="head_dim must be even"):
    apply_rope(jnp.ones((1, 2, 1, 5)), jnp.arange(2))
  with pytest.raises(ValueError, match="positions must be"):
    apply_rope(jnp.ones((1, 2, 1, 4)), jnp.arange(3))


# ------------------------------------------------------------------------------- short conv


def np_short_conv(x, kernel, bias, segment_ids=None):
  """y_t = bias + sum_k kernel[k] x_{t-(K-1)+k}, taps from other documents (or t<0) dropped."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  K = kernel.shape[0]
  y = np.zeros_like(x) + bias
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for k in range(K):
        s = t - (K - 1) + k
        if s >= 0 and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t]):
          y[b, t] += kernel[k] * x[b, s]
  return y


@functools.partial(jax.jit, static_argnums=0)
def japply(m, params, x, segment_ids=None, cache=None):
  return m.apply(params, x, segment_ids=segment_ids, cache=cache)


def stream(m, params, x, sizes, segment_ids=None):
  return mixer_testing.stream(japply, m, params, x, sizes, segment_ids)


SEG = np.array([[1] * 5 + [2] * 2 + [3] * 7, [0] * 9 + [5] * 5], np.int32)  # doc of 2 < K-1 = 3


def test_short_conv_parallel_streaming_and_numpy_agree():
  x = randn(7, (2, 14, 5))
  m = ShortConv(kernel_size=4, d_model=5)
  params = randomize(jax.jit(m.init)(jax.random.key(0), x), 30)
  kernel, bias = params["params"]["kernel"], np.asarray(params["params"]["bias"], np.float64)
  assert kernel.shape == (4, 5)
  ref = np_short_conv(x, kernel, bias)
  y, cache = japply(m, params, x)
  assert cache is None and rel(y, ref) < 1e-6
  for sizes in ([1] * 14, [4, 1, 2, 7], [2, 5, 2, 1, 4]):
    y_s, _ = stream(m, params, x, sizes)
    assert rel(y_s, ref) < 1e-6
  check_directional_grad(lambda xx, kk: m.apply({"params": {"kernel": kk, "bias": bias}}, xx)[0],
                         lambda xx, kk: np_short_conv(xx, kk, bias), [x, kernel])


def test_short_conv_segment_resets():
  x = randn(8, (2, 14, 5))
  m = ShortConv(kernel_size=4, d_model=5)
  params = randomize(jax.jit(m.init)(jax.random.key(0), x), 40)
  kernel, bias = params["params"]["kernel"], np.asarray(params["params"]["bias"], np.float64)
  ref = np_short_conv(x, kernel, bias, SEG)
  seg = jnp.asarray(SEG)
  y, _ = japply(m, params, x, seg)
  assert rel(y, ref) < 1e-6
  # Packing == running the documents separately.
  for b in range(2):
    for doc in np.unique(SEG[b]):
      idx = np.nonzero(SEG[b] == doc)[0]
      alone, _ = m.apply(params, x[b:b + 1, idx[0]:idx[-1] + 1])
      assert rel(y[b:b + 1, idx[0]:idx[-1] + 1], alone) < 1e-6
  # Streaming: a chunk ending inside the 2-token document must not leak document 1 into 3.
  for sizes in ([1] * 14, [4, 2, 1, 7], [6, 8], [5, 2, 7]):
    y_s, cache = stream(m, params, x, sizes, seg)
    assert rel(y_s, ref) < 1e-6
    np.testing.assert_array_equal(cache["segment_id"], SEG[:, -1])
  assert rel(y, japply(m, params, x)[0]) > 1e-2  # the resets matter here


def test_short_conv_kernel_size_one_and_errors():
  x = randn(9, (2, 6, 3))
  m = ShortConv(kernel_size=1, use_bias=False, d_model=3)
  params = m.init(jax.random.key(0), x)
  assert "bias" not in params["params"]
  ref = np.asarray(x, np.float64) * np.asarray(params["params"]["kernel"][0], np.float64)
  assert rel(japply(m, params, x)[0], ref) < 1e-6
  assert rel(stream(m, params, x, [2, 4])[0], ref) < 1e-6
  with pytest.raises(ValueError, match="set ShortConv.d_model or pass channels="):
    ShortConv().init_cache(2, jnp.float32)
  assert ShortConv().init_cache(2, jnp.float32, channels=7)["inputs"].shape == (2, 3, 7)
  with pytest.raises(ValueError, match=r"ShortConv\(d_model=4\) got x with 3 channels"):
    ShortConv(d_model=4).init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------- registry


class ToyMixer(nn.Module):
  """y_t = tanh(W x_t) + (running sum of x within the document); the cache is the running sum."""

  d_model: int
  scale: float = 1.0

  ssm_param_names = ()

  def init_cache(self, batch_size, dtype):
    return {"sum": jnp.zeros((batch_size, self.d_model), jnp.float32),
            "segment_id": jnp.full((batch_size,), -1, jnp.int32)}

  @nn.compact
  def __call__(self, x, *, segment_ids=None, cache=None):
    w = self.param("w", nn.initializers.normal(1.0), (self.d_model, self.d_model))
    total = jnp.zeros((x.shape[0], self.d_model)) if cache is None else cache["sum"]
    outs = []
    for t in range(x.shape[1]):
      if segment_ids is not None and (t > 0 or cache is not None):
        prev = cache["segment_id"] if t == 0 else segment_ids[:, t - 1]
        total = jnp.where((segment_ids[:, t] == prev)[:, None], total, 0.0)
      total = total + x[:, t]
      outs.append(jnp.tanh(x[:, t] @ w) * self.scale + total)
    y = jnp.stack(outs, 1)
    if cache is None:
      return y, None
    seg_last = cache["segment_id"] if segment_ids is None else segment_ids[:, -1]
    return y, {"sum": total, "segment_id": seg_last}


@pytest.fixture
def toy_registered():
  register_mixer("toy_test_mixer", ToyMixer)
  register_mixer("toy_test_lazy", f"{__name__}:ToyMixer")
  yield
  for name in ("toy_test_mixer", "toy_test_lazy", "toy_bad_module", "toy_bad_attr"):
    blocks._MIXERS.pop(name, None)


def test_registry(toy_registered):
  assert "s4d" in mixer_names() and get_mixer("s4d") is S4D
  assert get_mixer("toy_test_mixer") is ToyMixer
  assert get_mixer("toy_test_lazy") is ToyMixer
  register_mixer("toy_test_mixer", ToyMixer)  # same target again: fine
  with pytest.raises(ValueError) as e:
    get_mixer("no_such_mixer")
  assert "unknown mixer 'no_such_mixer'" in str(e.value)
  assert "s4d" in str(e.value) and "toy_test_mixer" in str(e.value)
  with pytest.raises(ValueError, match="already registered"):
    register_mixer("toy_test_mixer", S4D)
  register_mixer("toy_test_mixer", S4D, overwrite=True)
  assert get_mixer("toy_test_mixer") is S4D
  with pytest.raises(ValueError, match="'package.module:ClassName'"):
    register_mixer("toy_bad_module", "layers.s4d.S4D")
  with pytest.raises(ValueError, match="flax.linen Module class"):
    register_mixer("toy_bad_module", len)
  register_mixer("toy_bad_module", "layers.no_such_module:X")
  with pytest.raises(ImportError, match="mixer 'toy_bad_module': cannot import module"):
    get_mixer("toy_bad_module")
  register_mixer("toy_bad_attr", "layers.s4d:NoSuchClass")
  with pytest.raises(ValueError, match="module 'layers.s4d' has no attribute 'NoSuchClass'"):
    get_mixer("toy_bad_attr")


# --------------------------------------------------------------------------- residual block


def np_toy(x, w, scale, segment_ids=None):
  x = np.asarray(x, np.float64)
  y, total = np.zeros_like(x), np.zeros_like(x[:, 0])
  for t in range(x.shape[1]):
    if segment_ids is not None and t > 0:
      total = np.where((segment_ids[:, t] == segment_ids[:, t - 1])[:, None], total, 0.0)
    total = total + x[:, t]
    y[:, t] = np.tanh(x[:, t] @ w) * scale + total
  return y


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("prenorm", [True, False])
def test_residual_block_matches_numpy_composition(toy_registered, norm, prenorm):
  x = randn(10, (2, 7, 6))
  block = ResidualBlock(6, "toy_test_mixer", (("scale", 0.7),), norm=norm, prenorm=prenorm,
                        mlp_ratio=2)
  params = randomize(jax.jit(block.init)(jax.random.key(0), x), 50)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  assert set(p) == {"mixer_norm", "mixer_layer", "mlp_norm", "mlp"}

  def np_norm(h, q):
    return np_layer(h, q["scale"], q["bias"], 1e-5) if norm == "layer" else np_rms(
        h, q["scale"], 1e-6)

  def np_block(h, seg=None):
    mix = lambda z: np_toy(z, p["mixer_layer"]["w"], 0.7, seg)
    mlp = lambda z: np_gated_mlp(z, p["mlp"], "swiglu")
    for f, q in ((mix, p["mixer_norm"]), (mlp, p["mlp_norm"])):
      h = h + f(np_norm(h, q)) if prenorm else np_norm(h + f(h), q)
    return h

  y, cache = japply(block, params, x)
  assert cache is None
  assert rel(y, np_block(np.asarray(x, np.float64))) < 1e-5
  seg = SEG[:, :7]
  assert rel(japply(block, params, x, jnp.asarray(seg))[0],
             np_block(np.asarray(x, np.float64), seg)) < 1e-5
  check_directional_grad(lambda xx: block.apply(params, xx)[0], np_block, [x])


def test_residual_block_with_s4d_streams_and_takes_dict_kwargs():
  x = randn(11, (2, 9, 8))
  block = ResidualBlock(8, "s4d", {"d_state": 4}, norm="rms", mlp_ratio=1)
  params = jax.jit(block.init)(jax.random.key(0), x)
  run = jax.jit(lambda p, xx, c: block.apply(p, xx, cache=c))
  y, _ = run(params, x, None)

  @jax.jit
  def explicit(p, x):  # the composition, from the submodules' own apply
    h = x + S4D(8, d_state=4).apply({"params": p["mixer_layer"]},
                                    RMSNorm().apply({"params": p["mixer_norm"]}, x))[0]
    return h + GatedMLP(8).apply({"params": p["mlp"]},
                                 RMSNorm().apply({"params": p["mlp_norm"]}, h))

  assert rel(y, explicit(params["params"], x)) < 1e-6
  cache = block.init_cache(2, jnp.float32)  # unbound module
  assert cache["state"].shape == (2, 8, 2)
  assert jax.tree.all(jax.tree.map(
      lambda a, b: a.shape == b.shape,
      block.apply(params, 2, jnp.float32, method="init_cache"), cache))  # bound module
  outs = []
  for a, b in ((0, 4), (4, 5), (5, 9)):
    y_c, cache = run(params, x[:, a:b], cache)
    outs.append(y_c)
  assert rel(jnp.concatenate(outs, 1), y) < 1e-5


def test_residual_block_dropout_and_errors(toy_registered):
  x = randn(12, (2, 5, 4))
  block = ResidualBlock(4, "toy_test_mixer", dropout=0.5, deterministic=False)
  params = jax.jit(block.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
  y1, _ = block.apply(params, x, rngs={"dropout": jax.random.key(2)})
  y2, _ = block.apply(params, x, rngs={"dropout": jax.random.key(3)})
  assert rel(y1, y2) > 1e-2
  with pytest.raises(ValueError, match="ResidualBlock.norm='batch'"):
    ResidualBlock(4, "toy_test_mixer", norm="batch").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown mixer 'nope'"):
    ResidualBlock(4, "nope").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="must not contain 'd_model'"):
    ResidualBlock(4, "toy_test_mixer", {"d_model": 4}).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="mixer_kwargs must be a mapping"):
    ResidualBlock(4, "toy_test_mixer", ("scale",)).init(jax.random.key(0), x)


def test_sequence_parallel_needs_a_seq_axis_field(toy_registered):
  x = jnp.ones((1, 4, 8))
  block = ResidualBlock(d_model=8, mixer="toy_test_mixer", seq_axis="seq")
  with pytest.raises(ValueError, match="'toy_test_mixer' .* has no seq_axis field"):
    block.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="must not contain 'seq_axis'"):
    ResidualBlock(d_model=8, mixer="s4d", mixer_kwargs=(("seq_axis", "seq"),)).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="streaming .* and seq_axis do not combine"):
    conv = ShortConv(kernel_size=3, d_model=8, seq_axis="seq")
    conv.init(jax.random.key(0), x, cache=conv.init_cache(1))
