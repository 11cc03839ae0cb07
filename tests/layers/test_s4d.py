"""Tests for layers/s4d.py (S4D) against float64 numpy references built from the definitions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.special import erf

import layers.s4d as s4d_lib
from layers import hippo
from layers.s4d import (S4D, default_kernel_chunk_size, s4d_discretize, s4d_inv_init,
                        s4d_kernel, s4d_legs_init, s4d_lin_init, s4d_random_init)
from layers.s4 import S4
from layers.s5 import S5
from tests.layers import mixer_testing
from tests.layers.sequence_parallel_check import sequence_parallel_errors
from tests.numerics import rel


def tree_rel(out, ref) -> float:
  return max(rel(o, r) for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))


def random_ssm(rng, h, n2, channels=1):
  """Random stable continuous SSM parameters as numpy complex128."""
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), h))
  A = -rng.uniform(0.1, 1.0, (h, n2)) + 1j * rng.uniform(0, 3 * n2, (h, n2))
  B = rng.normal(size=(h, n2)) + 1j * rng.normal(size=(h, n2))
  C = rng.normal(size=(channels, h, n2)) + 1j * rng.normal(size=(channels, h, n2))
  return dt, A, B, C


def dense_kernel(dt, A, B, C, length, discretization="zoh", seed=0):
  """K[c, l, h] = C Abar^l Bbar in float64 from the dense system, by explicit matrix powers.

  The conjugate modes are written out (state size N, not N/2) and the state is rotated by a random
  unitary Q, so A is a full matrix: Abar = expm(dt A) (zoh) or (I - dt A/2)^-1 (I + dt A/2)
  (bilinear) by dense linear algebra. The sequence Abar^l Bbar is built 64 steps at a time:
  the first 64 by repeated products, each later block as Abar^64 times the block before.
  """
  rng = np.random.default_rng(seed)
  channels, h, n2 = C.shape
  n, eye = 2 * n2, np.eye(2 * n2)
  a_bar, b_bar, c_full = [], [], []
  for hh in range(h):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))
    a = q @ np.diag(np.concatenate([A[hh], A[hh].conj()])) @ q.conj().T
    b = q @ np.concatenate([B[hh], B[hh].conj()])
    c_full.append(np.concatenate([C[:, hh], C[:, hh].conj()], axis=-1) @ q.conj().T)
    if discretization == "zoh":
      a_bar.append(scipy.linalg.expm(dt[hh] * a))
      b_bar.append(np.linalg.solve(a, (a_bar[-1] - eye) @ b))
    else:
      m = eye - 0.5 * dt[hh] * a
      a_bar.append(np.linalg.solve(m, eye + 0.5 * dt[hh] * a))
      b_bar.append(np.linalg.solve(m, dt[hh] * b))
  a_bar, c_full = np.stack(a_bar), np.stack(c_full)  # [h, n, n], [h, c, n]
  step = 64
  block = [np.stack(b_bar)]  # x_l [h, n] for l = 0 .. step-1
  for _ in range(step - 1):
    block.append(np.einsum("hij,hj->hi", a_bar, block[-1]))
  block = np.stack(block, -1)  # [h, n, step]
  jump = np.stack([np.linalg.matrix_power(ab, step) for ab in a_bar])
  blocks = [block]
  for _ in range(-(-length // step) - 1):
    blocks.append(jump @ blocks[-1])
  xs = np.concatenate(blocks, -1)[..., :length]  # [h, n, L]
  k = np.einsum("hcn,hnl->clh", c_full, xs)
  # The conjugate pairs make the output real: a check on the reference itself.
  assert np.abs(k.imag).max() <= 1e-9 * np.abs(k.real).max()
  return k.real


# Re(A) and Im(A) from the stored parameter, per transform (the class docstring's tables).
REAL_OF = {"exp": ("log_A_real", lambda s: -np.exp(s)),
           "softplus": ("A_real_softplus", lambda s: -np.logaddexp(0.0, s)),
           "relu": ("A_real_relu", lambda s: -(np.maximum(s, 0.0) + 1e-4)),
           "none": ("A_real", lambda s: s)}
IMAG_OF = {"none": ("A_imag", lambda s: s),
           "exp": ("log_A_imag", np.exp),
           "softplus": ("A_imag_softplus", lambda s: np.logaddexp(0.0, s)),
           "relu": ("A_imag_relu", lambda s: np.maximum(s, 0.0))}


def numpy_ssm(params, opts):
  """(dt [H], A [H, N/2], B [H, N/2], C [c, H, N/2], D [H]) in float64 from the stored params."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  real_name, real_of = REAL_OF[opts.get("real_transform", "exp")]
  imag_name, imag_of = IMAG_OF[opts.get("imag_transform", "none")]
  A = real_of(p[real_name]) + 1j * imag_of(p[imag_name])  # [n_ssm, N/2]
  B = p["B"][..., 0] + 1j * p["B"][..., 1]
  h = p["log_dt"].shape[0]
  group = np.arange(h) // (h // A.shape[0])  # contiguous blocks of channels share A and B
  C = p["C"][..., 0] + 1j * p["C"][..., 1]
  return np.exp(p["log_dt"]), A[group], B[group], C, p["D"]


def perturb(params, seed, scale=0.05):
  """Moves every SSM parameter off its initial value, so the maps are tested beyond the init."""
  rng = np.random.default_rng(seed)
  out = jax.tree.map(np.asarray, params)
  for name, value in out["params"].items():
    if name not in ("C", "D", "out_proj", "log_dt"):
      out["params"][name] = value + scale * rng.standard_normal(value.shape)
  return out


# ----------------------------------------------------------------------------- pure functions


def test_lin_and_inv_init_match_paper_formulas():
  for n_state in (2, 8, 64):
    lin, inv = s4d_lin_init(n_state), s4d_inv_init(n_state)
    assert lin.shape == inv.shape == (n_state // 2,)
    for n in range(n_state // 2):
      assert lin[n] == pytest.approx(complex(-0.5, np.pi * n), rel=1e-14, abs=1e-14)
      assert inv[n] == pytest.approx(
          complex(-0.5, n_state / np.pi * (n_state / (2 * n + 1) - 1)), rel=1e-14, abs=1e-14)
  with pytest.raises(ValueError, match="d_state must be an even"):
    s4d_lin_init(7)


def test_legs_init_is_the_diagonal_part_of_the_hippo_dplr():
  for n_state in (2, 8, 32):
    A, B = s4d_legs_init(n_state)
    lam, _, b_hippo, _ = hippo.nplr("legs", n_state)
    assert A.shape == B.shape == (n_state // 2,)
    # hippo keeps Im(Lambda) >= 0, the S4D convention, so nothing is conjugated.
    np.testing.assert_array_equal(A, lam)
    np.testing.assert_array_equal(B, b_hippo)
    # Independently of hippo: the eigenvalues of the normal part A + P P^T of HiPPO-LegS
    # (A[n,k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) on the diagonal, P_n = sqrt(n + 1/2)).
    a_legs = np.zeros((n_state, n_state))
    for n in range(n_state):
      for k in range(n + 1):
        a_legs[n, k] = -(n + 1) if n == k else -np.sqrt((2 * n + 1) * (2 * k + 1))
    p = np.sqrt(np.arange(n_state) + 0.5)
    eig = np.linalg.eigvals(a_legs + np.outer(p, p))
    ours = np.concatenate([A, A.conj()])
    order, order_ref = np.argsort(ours.imag), np.argsort(eig.imag)  # Re is -1/2 for all
    np.testing.assert_allclose(ours[order], eig[order_ref], atol=1e-10)
    assert (A.imag >= 0).all() and np.allclose(A.real, -0.5, atol=1e-12)


def test_random_init_distribution():
  a = np.asarray(s4d_random_init(jax.random.key(0), 64, (64,)))  # [64, 32]
  assert a.shape == (64, 32) and a.dtype == np.complex64
  np.testing.assert_array_equal(a.real, -0.5)
  u = a.imag / np.pi  # Uniform(0, N/2 = 32), i.i.d.
  assert u.min() >= 0 and u.max() < 32
  # 2048 draws: mean 16 +- 0.2 (1 sigma), quartiles 8/16/24 +- ~0.4.
  assert abs(u.mean() - 16) < 1.0
  np.testing.assert_allclose(np.quantile(u, [0.25, 0.5, 0.75]), [8, 16, 24], atol=1.5)
  assert np.abs(np.diff(u, axis=0)).min() > 0  # every SSM gets its own draw


def test_discretize_zoh_and_bilinear():
  rng = np.random.default_rng(0)
  dt, A, B, _ = random_ssm(rng, 3, 4)
  args = (jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.complex64),
          jnp.asarray(B, jnp.complex64))
  dA, dB = s4d_discretize(*args)
  # ZOH: dB = int_0^dt exp(tau A) dtau * B, here by a fine midpoint rule.
  taus = (np.arange(4000) + 0.5) / 4000
  integral = np.stack([np.mean(np.exp(np.outer(dt[i] * taus, A[i])), 0) * dt[i] for i in range(3)])
  assert rel(dA, np.exp(dt[:, None] * A)) < 1e-6
  assert rel(dB, integral * B) < 1e-6
  dA, dB = s4d_discretize(*args, discretization="bilinear")
  z = dt[:, None] * A
  assert rel(dA, (1 + z / 2) / (1 - z / 2)) < 1e-6
  assert rel(dB, dt[:, None] / (1 - z / 2) * B) < 1e-6
  with pytest.raises(ValueError, match="discretization='euler' is not one of"):
    s4d_discretize(*args, discretization="euler")


def test_zoh_at_a_zero_mode_is_finite():
  """A = 0 is reachable with the 'none' transforms: dB -> dt B, gradients stay finite."""
  with jax.enable_x64(True):
    dt = jnp.asarray([0.1, 0.2])
    B = jnp.asarray([[1.0 + 2.0j, 0.5], [1.0, -1.0j]])

    def f(a_re):
      A = jax.lax.complex(a_re, jnp.zeros_like(a_re))
      return s4d_discretize(dt, A, B)[1]

    a_re = jnp.asarray([[0.0, -1e-9], [0.0, -0.3]])
    dB = np.asarray(jax.jit(f)(a_re))
    ref = np.asarray(dt)[:, None] * np.asarray(B) * np.where(
        np.asarray(a_re) == 0, 1.0, np.expm1(np.asarray(dt)[:, None] * a_re)
        / (np.asarray(dt)[:, None] * a_re))
    assert rel(dB, ref) < 1e-12
    g = jax.jit(jax.grad(lambda a: jnp.sum(jnp.abs(f(a)) ** 2)))(a_re)
    assert np.isfinite(np.asarray(g)).all()
    # At A = 0, d dB / dA = dt^2/2 B, so d|dB|^2 / dA = 2 Re(conj(dB) dt^2/2 B) = dt^3 |B|^2.
    np.testing.assert_allclose(np.asarray(g)[:, 0], (np.asarray(dt) ** 3 * np.abs(
        np.asarray(B)[:, 0]) ** 2), rtol=1e-6)


@pytest.mark.parametrize("discretization,chunk_size", [("zoh", None), ("bilinear", 8)])
def test_kernel_matches_dense_powers(discretization, chunk_size):
  rng = np.random.default_rng(1)
  length = 37  # not a multiple of the chunk size
  dt, A, B, C = random_ssm(rng, 3, 5, channels=2)
  ref = dense_kernel(dt, A, B, C, length, discretization)
  kw = dict(discretization=discretization, chunk_size=chunk_size)
  with jax.enable_x64(True):
    k64 = s4d_kernel(jnp.asarray(dt), jnp.asarray(A), jnp.asarray(B), jnp.asarray(C), length, **kw)
    assert k64.dtype == jnp.float64
    assert rel(k64, ref) < 1e-12
  k32 = s4d_kernel(jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.complex64),
                   jnp.asarray(B, jnp.complex64), jnp.asarray(C, jnp.complex64), length, **kw)
  assert k32.shape == (2, length, 3) and k32.dtype == jnp.float32
  # float32 phases l*dt*Im(A) reach ~1e2 rad here, so the kernel carries ~1e2 * 6e-8 absolute
  # phase error: a few 1e-6 relative.
  assert rel(k32, ref) < 1e-5
  k1 = s4d_kernel(jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.complex64),
                  jnp.asarray(B, jnp.complex64), jnp.asarray(C[0], jnp.complex64), length, **kw)
  assert k1.shape == (length, 3) and rel(k1, ref[0]) < 1e-5


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_kernel_gradients_match_finite_differences_float64(discretization):
  """Gradients of the (chunked, rematerialised) kernel wrt dt, A, B, C by central differences."""
  rng = np.random.default_rng(2)
  dt, A, B, C = random_ssm(rng, 2, 3, channels=2)
  cot = rng.standard_normal((2, 11, 2))
  with jax.enable_x64(True):
    args = [np.asarray(v) for v in (np.log(dt), A.real, A.imag, B.real, B.imag, C.real, C.imag)]

    def kernel_loss(log_dt, a_re, a_im, b_re, b_im, c_re, c_im):
      k = s4d_kernel(jnp.exp(log_dt), jax.lax.complex(a_re, a_im), jax.lax.complex(b_re, b_im),
                     jax.lax.complex(c_re, c_im), 11, discretization=discretization,
                     chunk_size=4)
      return jnp.sum(k * cot)

    value_and_grad = jax.jit(jax.value_and_grad(kernel_loss, argnums=tuple(range(7))))

    def loss(*a):
      return value_and_grad(*a)[0]

    grads = value_and_grad(*args)[1]
    eps = 1e-6
    for i, (arg, g) in enumerate(zip(args, grads)):
      v = rng.standard_normal(arg.shape)
      plus = [a + eps * v if j == i else a for j, a in enumerate(args)]
      minus = [a - eps * v if j == i else a for j, a in enumerate(args)]
      fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
      an = float(np.sum(np.asarray(g) * v))
      assert abs(fd - an) <= 1e-6 * abs(an), (i, fd, an)


def test_default_kernel_chunk_size():
  limit = s4d_lib.KERNEL_CHUNK_ELEMENTS
  assert default_kernel_chunk_size(256 * 32, limit // (256 * 32)) is None
  chunk = default_kernel_chunk_size(256 * 32, 16384)
  assert chunk * 256 * 32 <= limit < 2 * chunk * 256 * 32 and chunk & (chunk - 1) == 0
  assert default_kernel_chunk_size(3 * limit, 2) == 1


def test_kernel_memory_is_bounded_at_long_length():
  """L = 16384, H = 256, N/2 = 32: the whole Vandermonde would be L*H*N/2 complex64 = 1 GiB.

  By default (automatic chunking) neither the forward nor the gradient holds a buffer that large;
  with chunk_size = L it does, so the assertion can fail. Lower and compile only.
  """
  length, h, n2 = 16384, 256, 32
  full = length * h * n2 * 8
  shapes = (jax.ShapeDtypeStruct((h,), jnp.float32), jax.ShapeDtypeStruct((h, n2), jnp.complex64),
            jax.ShapeDtypeStruct((h, n2), jnp.complex64),
            jax.ShapeDtypeStruct((1, h, n2), jnp.complex64))

  def temp_bytes(fn):
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  def fwd(chunk):
    return lambda *a: s4d_kernel(*a, length, chunk_size=chunk)

  def grad(chunk):
    return jax.grad(lambda *a: jnp.sum(fwd(chunk)(*a) ** 2), argnums=(0, 1, 2, 3))

  assert temp_bytes(fwd(None)) < full / 8
  assert temp_bytes(grad(None)) < full / 4
  # The control: unchunked, the compiled kernel does hold a Vandermonde-sized buffer (the whole
  # 1 GiB on CPU; the H200 fuses half of it away, 0.55 GiB), far above the bounds asserted above.
  assert temp_bytes(fwd(length)) >= full / 2


# ----------------------------------------------------------------------------- module kernels

KH, KSTATE, KL = 4, 16, 4096
KERNEL_CASES = [  # every init x discretisation, every transform on each side, tying, chunking
    dict(a_init="lin"),
    dict(a_init="lin", discretization="bilinear", real_transform="softplus", imag_transform="exp"),
    dict(a_init="inv", real_transform="relu", imag_transform="softplus", n_ssm=2),
    dict(a_init="inv", discretization="bilinear", real_transform="none", imag_transform="relu"),
    dict(a_init="legs"),
    dict(a_init="legs", discretization="bilinear", real_transform="softplus",
         imag_transform="softplus", n_ssm=1),
    dict(a_init="random", real_transform="none", imag_transform="exp", n_ssm=2),
    dict(a_init="random", discretization="bilinear", real_transform="relu", kernel_chunk_size=1000),
]


def case_id(opts):
  return "-".join(f"{v}" for v in opts.values()) or "default"


def module_kernel_errors(opts, seed=0):
  """Relative errors of the module's kernel vs `dense_kernel` at L = 256, 1024, 4096.

  Returns {"float64": [...], "float32": [...]}; the reference of each precision is built from that
  precision's parameter values (float32 values converted exactly to float64).
  """
  m = S4D(d_model=KH, d_state=KSTATE, **opts)
  params = perturb(m.init(jax.random.key(seed), jnp.ones((2, 16, KH))), seed)
  errors = {}
  for name, dtype in (("float64", np.float64), ("float32", np.float32)):
    p = jax.tree.map(lambda a, d=dtype: np.asarray(a, d), params)
    dt, A, B, C, _ = numpy_ssm(p, opts)
    ref = dense_kernel(dt, A, B, C, KL, opts.get("discretization", "zoh"), seed)
    with jax.enable_x64(name == "float64"):
      k = np.asarray(m.apply(p, KL, method="kernel"))
    assert k.dtype == dtype and k.shape == (1, KL, KH)
    errors[name] = [rel(k[:, :n], ref[:, :n]) for n in (256, 1024, KL)]
  return errors


@pytest.mark.parametrize("opts", KERNEL_CASES, ids=case_id)
def test_module_kernel_matches_dense_reference_up_to_4096(opts):
  errors = module_kernel_errors(opts)
  assert max(errors["float64"]) < 1e-8, errors
  # float32: the exponent l * log dA carries ~l |dt A| * 6e-8 absolute error (phase drift);
  # the decay exp(-l dt/2) bounds its weight in the norm. Measured worst case 5.9e-6 on CPU;
  # on an H200 (jax 0.11.2, less exact float32 sin/cos/exp) LegS + bilinear reached 1.5e-5.
  tol = 1e-5 if jax.default_backend() == "cpu" else 2e-5
  assert max(errors["float32"]) < tol, errors


# ----------------------------------------------------------------------------- module helpers

H, NSTATE = 4, 8


def randn(seed, shape):
  # numpy, not jax.random: each new shape would compile a threefry program (~1 s on this CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


L = 16  # most tests share shapes so that compiled functions are reused (2 shared CPU cores)


# Compile-time budget (2 shared CPU cores): eager init and convolution mode reuse JAX's cached
# per-op executables across layer options (~10 ms), where a jit compiles each option set anew
# (~1 s); the recurrent modes (scans) are jitted, as eager control flow recompiles on every call.
def init(m, key, x):
  return m.init(key, x)


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(m, params, x, segment_ids=None, cache=None):
  return m.apply(params, x, segment_ids=segment_ids, cache=cache)


def apply(m, params, x, segment_ids=None, cache=None):
  if segment_ids is None and cache is None:
    return m.apply(params, x)
  return _apply_jit(m, params, x, segment_ids, cache)


@functools.partial(jax.jit, static_argnums=0)
def grads(m, params, x, cot, segment_ids=None):
  """(loss, (d loss / d params, d loss / d x)) for loss = sum(y * cot)."""
  def loss(p, xx):
    return jnp.sum(m.apply(p, xx, segment_ids=segment_ids)[0] * cot)
  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def make(seed=0, length=L, batch=2, perturbed=False, **kw):
  m = S4D(d_model=H, d_state=NSTATE, **kw)
  x = randn(seed, (batch, length, H))
  params = init(m, jax.random.key(seed + 100), x)
  if perturbed:
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), perturb(params, seed))
  return m, params, x


def numpy_layer(params, x, bidirectional=False, **opts):
  """The full S4D layer in float64 numpy, straight from the definition (direct sums)."""
  dt, A, B, C, D = numpy_ssm(params, opts)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  u = np.asarray(x, np.float64)
  length = u.shape[1]
  K = dense_kernel(dt, A, B, C, length, opts.get("discretization", "zoh"))
  y = np.zeros_like(u)
  for t in range(length):
    for s in range(length):
      if s <= t:
        y[:, t] += K[0, t - s] * u[:, s]
      elif bidirectional:
        y[:, t] += K[1, s - t - 1] * u[:, s]
  y = y + D * u
  y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # exact GELU
  z = y @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
  return z[..., :H] / (1 + np.exp(-z[..., H:]))  # GLU: a * sigmoid(b)


TIED_BILINEAR = dict(discretization="bilinear", n_ssm=2, real_transform="softplus",
                     imag_transform="exp")


@pytest.mark.parametrize("bidirectional,opts", [(False, {}), (True, {}), (True, TIED_BILINEAR)],
                         ids=["causal", "bidirectional", "bidirectional-tied-bilinear"])
def test_conv_and_recurrent_modes_match_numpy_definition(bidirectional, opts):
  m, params, x = make(bidirectional=bidirectional, perturbed=bool(opts), **opts)
  ref = numpy_layer(params, x, bidirectional, **opts)
  y, cache = apply(m, params, x)
  assert cache is None
  assert rel(y, ref) < 1e-5
  y_rec, cache = apply(m, params, x, jnp.full(x.shape[:2], 3, jnp.int32))
  assert cache is None
  assert rel(y_rec, ref) < 1e-5


def test_init_ranges():
  m = S4D(d_model=64, d_state=16, dt_min=2e-3, dt_max=5e-2)
  # Unique shapes: one jit (~1.5 s) is cheaper than compiling each eager op for them (~4 s).
  params = jax.jit(m.init)(jax.random.key(0), jnp.ones((1, 4, 64)))["params"]
  dt = np.exp(np.asarray(params["log_dt"]))
  assert dt.min() >= 2e-3 * (1 - 1e-6) and dt.max() <= 5e-2 * (1 + 1e-6)
  # log-uniform: log dt spread over the interval, not clumped at one end
  assert np.ptp(np.log(dt)) > 0.7 * (np.log(5e-2) - np.log(2e-3))
  a_real = -np.exp(np.asarray(params["log_A_real"]))
  assert (a_real < 0).all() and np.allclose(a_real, -0.5)
  np.testing.assert_allclose(np.asarray(params["A_imag"])[5], np.pi * np.arange(8), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(params["B"])[..., 0], 1.0)
  np.testing.assert_allclose(np.asarray(params["B"])[..., 1], 0.0)
  c = np.asarray(params["C"])
  assert c.shape == (1, 64, 8, 2)
  assert 0.8 < np.mean(np.sum(c ** 2, -1)) < 1.2  # E|C|^2 = 1 for 512 samples
  inv = init(S4D(d_model=H, d_state=NSTATE, a_init="inv"), jax.random.key(1),
             jnp.ones((2, L, H)))
  np.testing.assert_allclose(np.asarray(inv["params"]["A_imag"])[2],
                             np.imag(s4d_inv_init(NSTATE)), rtol=1e-6)
  # Every name a stored SSM parameter can take, whatever the transforms.
  assert set(S4D.ssm_param_names) == {"log_dt", "B"} | {n for n, _ in REAL_OF.values()} | {
      n for n, _ in IMAG_OF.values()}
  assert len(set(S4D.ssm_param_names)) == len(S4D.ssm_param_names)


@pytest.mark.parametrize("real_transform,imag_transform",
                         [("exp", "none"), ("softplus", "exp"), ("relu", "softplus"),
                          ("none", "relu")])
def test_transforms_store_the_inverse_of_the_init(real_transform, imag_transform):
  m = S4D(d_model=H, d_state=NSTATE, real_transform=real_transform,
          imag_transform=imag_transform)
  params = init(m, jax.random.key(0), jnp.ones((2, L, H)))["params"]
  real_name, real_of = REAL_OF[real_transform]
  imag_name, imag_of = IMAG_OF[imag_transform]
  assert set(params) == {"log_dt", real_name, imag_name, "B", "C", "D", "out_proj"}
  assert params[real_name].shape == params[imag_name].shape == (H, NSTATE // 2)
  a_imag = np.pi * np.arange(NSTATE // 2)
  if imag_transform in ("exp", "softplus"):
    a_imag[0] = 1e-4  # Im(A) = 0 is out of reach of these transforms
  for row in range(H):
    np.testing.assert_allclose(real_of(np.asarray(params[real_name], np.float64)[row]), -0.5,
                               rtol=1e-6)
    np.testing.assert_allclose(imag_of(np.asarray(params[imag_name], np.float64)[row]), a_imag,
                               rtol=1e-6)
  if real_transform == "relu":  # the floor keeps modes decaying however far training pushes
    dt, A, _, _, _ = m.apply({"params": {**params, real_name: -10 + 0 * params[real_name]}},
                             method="ssm")
    np.testing.assert_allclose(np.asarray(A.real), -1e-4, rtol=1e-6)


def test_legs_and_random_module_init():
  x = jnp.ones((2, L, H))
  legs = init(S4D(d_model=H, d_state=NSTATE, a_init="legs"), jax.random.key(0), x)
  lam, _, b_hippo, _ = hippo.nplr("legs", NSTATE)
  _, A, B, _, _ = S4D(d_model=H, d_state=NSTATE, a_init="legs").apply(legs, method="ssm")
  for h in range(H):
    np.testing.assert_allclose(np.asarray(A[h]), lam, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(B[h]), b_hippo, rtol=1e-6)  # b_init="auto"
  ones = init(S4D(d_model=H, d_state=NSTATE, a_init="legs", b_init="ones"), jax.random.key(0), x)
  np.testing.assert_array_equal(np.asarray(ones["params"]["B"]), np.stack(
      [np.ones((H, NSTATE // 2)), np.zeros((H, NSTATE // 2))], -1))
  p = init(S4D(d_model=H, d_state=NSTATE, a_init="random", n_ssm=2), jax.random.key(1), x)
  p = np.asarray(p["params"]["A_imag"])
  assert p.shape == (2, NSTATE // 2)
  assert np.abs(np.diff(p, axis=0)).min() > 0  # one draw per SSM
  assert (p >= 0).all() and (p < np.pi * NSTATE / 2).all()


def test_n_ssm_ties_A_and_B_across_channel_groups():
  opts = TIED_BILINEAR
  m, params, x = make(seed=11, perturbed=True, **opts)
  p = params["params"]
  assert p["A_real_softplus"].shape == p["log_A_imag"].shape == (2, NSTATE // 2)
  assert p["B"].shape == (2, NSTATE // 2, 2)
  assert p["C"].shape == (1, H, NSTATE // 2, 2) and p["log_dt"].shape == (H,)
  dt, A, B, C, _ = m.apply(params, method="ssm")
  A, B = np.asarray(A), np.asarray(B)
  # Channels 0, 1 use SSM 0 and channels 2, 3 use SSM 1: equal within a group, not across.
  np.testing.assert_array_equal(A[0], A[1])
  np.testing.assert_array_equal(A[2], A[3])
  np.testing.assert_array_equal(B[0], B[1])
  np.testing.assert_array_equal(B[2], B[3])
  assert np.abs(A[1] - A[2]).min() > 0 and np.abs(B[1] - B[2]).min() > 0
  assert len(set(np.asarray(dt).tolist())) == H  # dt stays per channel
  # The same layer untied (n_ssm = H), with each group's A and B copied to its channels, is the
  # same function. Outputs against the numpy layer (which expands the groups itself) are checked
  # in test_all_modes_match_numpy_for_the_options, and the gradients of the shared parameters
  # (sums over their channels) by finite differences with n_ssm = 1.
  untied_m = S4D(d_model=H, d_state=NSTATE, **dict(opts, n_ssm=H))
  untied = jax.tree.map(lambda a: a, params)
  for name in ("A_real_softplus", "log_A_imag", "B"):
    untied["params"][name] = jnp.repeat(p[name], H // 2, axis=0)
  assert rel(apply(untied_m, untied, x)[0], apply(m, params, x)[0]) < 1e-6


def test_bad_fields_raise_clear_errors():
  x = jnp.ones((1, 4, 4))
  cases = [
      (dict(a_init="foo"), "S4D.a_init='foo' is not one of"),
      (dict(activation="bar"), "S4D.activation='bar'"),
      (dict(d_state=5), "d_state must be an even"),
      (dict(discretization="euler"), "S4D.discretization='euler' is not one of"),
      (dict(real_transform="sigmoid"), "S4D.real_transform='sigmoid' is not one of"),
      (dict(imag_transform="tanh"), "S4D.imag_transform='tanh' is not one of"),
      (dict(b_init="zeros"), "S4D.b_init='zeros' is not one of"),
      (dict(b_init="hippo", a_init="lin"), "b_init='hippo'.*needs a_init='legs'"),
      (dict(n_ssm=3), r"S4D.n_ssm=3 must be a positive divisor of d_model=4"),
      (dict(n_ssm=0), r"S4D.n_ssm=0 must be a positive divisor"),
      (dict(kernel_chunk_size=0), r"S4D.kernel_chunk_size=0 must be >= 1"),
      (dict(dt_min=0.1, dt_max=0.01), "0 < dt_min <= dt_max"),
  ]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message):
      S4D(d_model=4, **kw).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"needs x \[batch, length, 3\]"):
    S4D(d_model=3).init(jax.random.key(0), jnp.ones((1, 4, 5)))


def _check_cache(cache, x):
  assert cache["state"].dtype == jnp.complex64 and cache["state"].shape == (x.shape[0], H, 4)


def stream(m, params, x, sizes, segment_ids=None):
  return mixer_testing.stream(apply, m, params, x, sizes, segment_ids, check_cache=_check_cache)


def test_conv_equals_streaming_and_recurrent_modes():
  m, params, x = make(seed=1)
  y_conv, _ = apply(m, params, x)
  y_tok, _ = stream(m, params, x, [1] * L)
  y_chunk, _ = stream(m, params, x, [5, 1, 3, 5, 2])
  y_rec, _ = apply(m, params, x, jnp.full(x.shape[:2], 7, jnp.int32))
  # FFT (conv) vs sequential complex64 recurrence: both float32, different rounding.
  assert rel(y_tok, y_conv) < 1e-5
  assert rel(y_chunk, y_conv) < 1e-5
  assert rel(y_rec, y_conv) < 1e-5


STREAM_CASES = [
    TIED_BILINEAR,
    dict(a_init="legs", real_transform="relu", imag_transform="softplus"),
    dict(a_init="random", discretization="bilinear", real_transform="none",
         imag_transform="relu", kernel_chunk_size=5),
]


@pytest.mark.parametrize("opts", STREAM_CASES, ids=case_id)
def test_all_modes_match_numpy_for_the_options(opts):
  m, params, x = make(seed=13, perturbed=True, **opts)
  ref = numpy_layer(params, x, **opts)
  y_conv, _ = apply(m, params, x)
  y_rec, _ = apply(m, params, x, jnp.full(x.shape[:2], 2, jnp.int32))
  y_tok, _ = stream(m, params, x, [1] * L)
  y_chunk, cache = stream(m, params, x, [5, 5, 5, 1])
  for y in (y_conv, y_rec, y_tok, y_chunk):
    assert rel(y, ref) < 1e-5
  # Token-by-token and chunked streaming run the same recurrence as the segment scan.
  assert rel(y_tok, y_rec) < 1e-5 and rel(y_chunk, y_rec) < 1e-5
  dt, A, B, _, _ = numpy_ssm(params, opts)
  z = dt[:, None] * A
  if opts.get("discretization", "zoh") == "zoh":
    dA, dB = np.exp(z), np.expm1(z) / A * B
  else:
    dA, dB = (1 + z / 2) / (1 - z / 2), dt[:, None] / (1 - z / 2) * B
  state = np.zeros((2, H, NSTATE // 2), np.complex128)
  for t in range(L):
    state = dA * state + dB * np.asarray(x, np.float64)[:, t, :, None]
  assert rel(cache["state"], state) < 1e-5


def test_streaming_final_state_is_the_recurrence():
  m, params, x = make(seed=2)
  _, cache = stream(m, params, x, [5, 3, 1, 5, 2])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
  dA = np.exp(np.exp(p["log_dt"])[:, None] * A)
  dB = (dA - 1) / A * (p["B"][..., 0] + 1j * p["B"][..., 1])
  state = np.zeros((2, H, NSTATE // 2), np.complex128)
  for t in range(L):
    state = dA * state + dB * np.asarray(x, np.float64)[:, t, :, None]
  assert rel(cache["state"], state) < 1e-5


@pytest.mark.parametrize("opts", [{}, TIED_BILINEAR], ids=case_id)
def test_gradients_conv_mode_match_recurrent_mode(opts):
  m, params, x = make(seed=3, perturbed=bool(opts), **opts)
  cot = randn(9, x.shape)
  _, g_conv = grads(m, params, x, cot)
  _, g_rec = grads(m, params, x, cot, jnp.full(x.shape[:2], 1, jnp.int32))
  for path, leaf in jax.tree_util.tree_flatten_with_path(g_conv[0])[0]:
    assert np.abs(np.asarray(leaf)).max() > 0, jax.tree_util.keystr(path)
  # Gradients sum O(L) float32 products of both signs, so they lose a little more than outputs.
  assert tree_rel(g_conv, g_rec) < 1e-4


GRAD_CASES = [
    dict(),
    dict(discretization="bilinear", real_transform="softplus", imag_transform="exp", n_ssm=1),
    dict(a_init="legs", real_transform="relu", imag_transform="softplus", bidirectional=True),
    dict(a_init="random", discretization="bilinear", real_transform="none",
         imag_transform="relu"),
]


@pytest.mark.parametrize("opts", GRAD_CASES, ids=case_id)
def test_every_parameter_gradient_matches_finite_differences_float64(opts):
  """Segmented-recurrence mode in float64 (the convolution runs its FFT in float32; its kernel's
  gradients are checked in float64 above and against this mode in float32)."""
  rng = np.random.default_rng(5)
  m = S4D(d_model=H, d_state=NSTATE, **opts)
  params = perturb(init(m, jax.random.key(5), jnp.ones((2, L, H))), 5, scale=0.1)
  leaves, treedef = jax.tree.flatten(params)
  assert len(leaves) == 8  # log_dt, Re A, Im A, B, C, D, out_proj bias and kernel
  leaves = [np.asarray(a, np.float64) for a in leaves]
  x = rng.standard_normal((1, 8, H))
  cot = rng.standard_normal((1, 8, H))
  seg = np.asarray([[0, 0, 0, 0, 0, 1, 1, 1]], np.int32)
  with jax.enable_x64(True):
    # One compiled function gives the gradient and, at the shifted points, the loss.
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda ls: jnp.sum(m.apply(jax.tree.unflatten(treedef, ls), x, segment_ids=seg)[0] * cot)))
    g = [np.asarray(a) for a in value_and_grad(leaves)[1]]
    eps = 1e-6
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for i, (leaf, gl) in enumerate(zip(leaves, g)):
      assert gl.dtype == np.float64 and np.isfinite(gl).all(), names[i]
      v = rng.standard_normal(leaf.shape)
      shifted = [[a + sign * eps * v if j == i else a for j, a in enumerate(leaves)]
                 for sign in (1, -1)]
      fd = (float(value_and_grad(shifted[0])[0]) - float(value_and_grad(shifted[1])[0])) / (2 * eps)
      an = float(np.sum(gl * v))
      assert abs(an) > 0 and abs(fd - an) <= 1e-6 * abs(an), (names[i], fd, an)


def test_causality():
  m, params, x = make(seed=4)
  for seg in (None, jnp.zeros((2, L), jnp.int32)):
    jac = np.asarray(mixer_testing.max_jacobian(m, params, x, seg))
    future = jac[np.triu_indices(L, 1)]
    if seg is None:
      # The FFT path mixes all positions in floating point; no true wrap-around means the
      # future entries are pure round-off (~1e-8 of the past ones), not exactly zero.
      assert future.max() < 1e-6 * jac.max()
    else:
      assert future.max() == 0.0
    assert (np.diag(jac) > 0).all() and (jac[np.tril_indices(L, -1)] > 0).all()


def separate_reference(params, x, bidirectional=False, **opts):
  """numpy_layer run on each document on its own, concatenated back."""
  return mixer_testing.separate_documents(
      lambda xd: numpy_layer(params, xd, bidirectional, **opts), x)


def test_segment_resets_packing_equals_separate_documents():
  m, params, x = make(seed=5)
  # Through the streaming cache: chunks crossing a boundary, starting exactly on one (row 0 at 6
  # in the second schedule), and token by token.
  mixer_testing.check_packed_and_streamed(apply, stream, m, params, x, separate_reference(params, x),
                                          ([5, 2, 1, 3, 5], [3, 3, 5, 5], [1] * L))


def test_bidirectional_segments_equal_separate_documents():
  m, params, x = make(seed=6, bidirectional=True)
  seg = mixer_testing.two_documents(L)
  y_packed, _ = apply(m, params, x, seg)
  assert rel(y_packed, separate_reference(params, x, True)) < 1e-5
  mixer_testing.check_documents_do_not_mix(m, params, x, seg)


def test_bidirectional_cannot_stream():
  m, params, x = make(bidirectional=True)
  with pytest.raises(ValueError, match="streaming.*needs a causal layer"):
    m.init_cache(2, jnp.float32)
  cache = S4D(d_model=H, d_state=NSTATE).init_cache(2, jnp.float32)
  with pytest.raises(ValueError, match="streaming.*needs a causal layer"):
    m.apply(params, x, cache=cache)


def test_kernel_chunking_field_and_bf16():
  m, params, x = make(seed=7)
  y, _ = apply(m, params, x)
  y_chunked, _ = apply(S4D(d_model=H, d_state=NSTATE, kernel_chunk_size=6), params, x)
  assert rel(y_chunked, y) < 1e-6
  y16, _ = apply(m, params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert rel(y16, y) < 2e-2  # bf16 input rounding plus a bf16 output projection


def test_dropout_needs_rng_and_changes_output():
  m, params, x = make(seed=8)
  md = S4D(d_model=H, d_state=NSTATE, dropout=0.5, deterministic=False)
  run = jax.jit(lambda key: md.apply(params, x, rngs={"dropout": key})[0])
  y1, y2 = run(jax.random.key(0)), run(jax.random.key(1))
  assert rel(y1, y2) > 1e-2
  y_det, _ = apply(S4D(d_model=H, d_state=NSTATE, dropout=0.5), params, x)
  assert rel(y_det, apply(m, params, x)[0]) == 0.0


def test_s4_family_sequence_parallel_equals_whole_sequence():
  # One subprocess for S4D, S4 and S5: without segment ids S4D/S4 take the channel-sharded
  # convolution, with them (the harness's packed run) the sharded recurrences; S5 always scans.
  # A bidirectional layer runs the causal path too (plus the reverse scan / anti-causal kernel).
  errors = sequence_parallel_errors({
      "s4d_bidirectional": ("s4d", dict(d_state=16, bidirectional=True, n_ssm=2)),
      "s4": ("s4", dict(d_state=8)),
      "s4_bidirectional_zoh": ("s4", dict(d_state=8, bidirectional=True, discretization="zoh",
                                          n_ssm=2, rank=2)),
      "s5_bidirectional": ("s5", dict(d_state=16, bidirectional=True, blocks=2,
                                      discretization="bilinear")),
  })
  for label, errs in errors.items():
    for key, err in errs.items():
      assert err < 1e-5, (label, key, err)


@pytest.mark.parametrize("cls", [S4D, S4, S5])
def test_sequence_parallel_rejects_cache(cls):
  x = jnp.zeros((1, 4, 4))
  cache = cls(d_model=4, d_state=4).init_cache(1)
  with pytest.raises(ValueError, match="seq_axis"):
    cls(d_model=4, d_state=4, seq_axis="seq").init(jax.random.key(0), x, cache=cache)
