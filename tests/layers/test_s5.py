"""Tests for layers/s5.py (S5) against float64 numpy references built from the definitions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.linalg import expm
from scipy.special import erf

from layers.hippo import nplr
from layers.s5 import MAX_EIG_REAL, S5, hippo_n_init, s5_discretize, s5_ssm
from tests.layers import mixer_testing
from tests.numerics import rel


def to_f32(a: np.ndarray) -> np.ndarray:
  """Round to float32 / complex64 and back, so float32 runs and float64 references share inputs."""
  if np.iscomplexobj(a):
    return np.asarray(a, np.complex64).astype(np.complex128)
  return np.asarray(a, np.float32).astype(np.float64)


def legs_normal_part(n: int) -> np.ndarray:
  """HiPPO-N, written from the LegS closed form (independently of layers/hippo.py).

  LegS: A[i, k] = -sqrt((2i+1)(2k+1)) for i > k, -(i+1) for i = k, 0 above; with the rank-one
  term P_i = sqrt(i + 1/2), S = A + P P^T has S[i, k] = -sqrt((2i+1)(2k+1))/2 below the diagonal,
  +sqrt((2i+1)(2k+1))/2 above it and -1/2 on it: -1/2 I plus a skew-symmetric matrix.
  """
  s = np.zeros((n, n))
  for i in range(n):
    for k in range(n):
      if i == k:
        s[i, k] = -0.5
      else:
        s[i, k] = np.sign(k - i) * np.sqrt((2 * i + 1) * (2 * k + 1)) / 2
  return s


def sort_spectrum(z: np.ndarray) -> np.ndarray:
  return z[np.lexsort((np.round(z.real, 9), np.round(z.imag, 9)))]


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("d_state,blocks", [(16, 1), (16, 2), (12, 3)])
def test_hippo_n_init_is_legs_normal_part_block_by_block(d_state, blocks):
  n = d_state // blocks
  s = legs_normal_part(n)
  eigs = sort_spectrum(np.linalg.eigvals(s))
  lam_h, _, _, v_h = nplr("legs", n)
  for conj_sym in (True, False):
    lam, v = hippo_n_init(d_state, blocks, conj_sym)
    width = n // 2 if conj_sym else n
    assert lam.shape == (blocks * width,) and v.shape == (d_state, blocks * width)
    s_full = np.kron(np.eye(blocks), s)  # the block-diagonal HiPPO-N
    # Columns of V are eigenvectors of the block-diagonal matrix, orthonormal, with eigenvalue
    # Lambda; V is block-diagonal.
    assert rel(s_full @ v, v * lam) < 1e-12
    assert rel(v.conj().T @ v, np.eye(blocks * width)) < 1e-12
    for j in range(blocks):
      block = lam[j * width:(j + 1) * width]
      full = np.concatenate([block, block.conj()]) if conj_sym else block
      assert rel(sort_spectrum(full), eigs) < 1e-12  # the whole spectrum, pairs included
      np.testing.assert_allclose(block[:n // 2], lam_h, rtol=1e-12)
      rows, cols = slice(j * n, (j + 1) * n), slice(j * width, (j + 1) * width)
      np.testing.assert_allclose(v[rows, cols][:, :n // 2], v_h, rtol=1e-12, atol=1e-14)
    off_blocks = v[~np.kron(np.eye(blocks), np.ones((n, width))).astype(bool)]
    assert (off_blocks == 0).all()
  with pytest.raises(ValueError, match="blocks of an even size"):
    hippo_n_init(12, 5)
  with pytest.raises(ValueError, match="d_state=10 must split into blocks=2"):
    hippo_n_init(10, 2)


H, NSTATE, NBLOCKS = 4, 8, 2
L = 16  # most tests share shapes so that compiled functions are reused (2 shared CPU cores)


def randn(seed, shape):
  # numpy, not jax.random: each new shape would compile a threefry program (~1 s on this CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def init(m, key, x):
  return m.init(key, x)


@functools.partial(jax.jit, static_argnums=0)
def apply(m, params, x, segment_ids=None, cache=None):
  return m.apply(params, x, segment_ids=segment_ids, cache=cache)


def make(seed=0, length=L, batch=2, **kw):
  m = S5(d_model=H, d_state=NSTATE, blocks=NBLOCKS, **kw)
  x = randn(seed, (batch, length, H))
  return m, init(m, jax.random.key(seed + 100), x), x


def test_module_init_follows_the_paper():
  h, p_full, blocks = 24, 32, 4
  x = jnp.ones((1, 4, h))
  for conj_sym in (True, False):
    m = S5(d_model=h, d_state=p_full, blocks=blocks, conj_sym=conj_sym, dt_min=2e-3, dt_max=5e-2)
    params = init(m, jax.random.key(0), x)["params"]
    lam, v = hippo_n_init(p_full, blocks, conj_sym)
    np.testing.assert_allclose(params["Lambda_re"], lam.real, rtol=1e-6)
    np.testing.assert_allclose(params["Lambda_im"], lam.imag, rtol=1e-6, atol=1e-6)
    width = lam.shape[0] // blocks
    eigs = sort_spectrum(np.linalg.eigvals(legs_normal_part(p_full // blocks)))
    lam_param = np.asarray(params["Lambda_re"]) + 1j * np.asarray(params["Lambda_im"])
    for j in range(blocks):  # each block carries the whole HiPPO-N spectrum of size P/J
      block = lam_param[j * width:(j + 1) * width].astype(np.complex128)
      full = np.concatenate([block, block.conj()]) if conj_sym else block
      assert rel(sort_spectrum(full), eigs) < 1e-6
    dt = np.exp(np.asarray(params["log_dt"]))
    assert dt.shape == lam.shape
    assert dt.min() >= 2e-3 * (1 - 1e-6) and dt.max() <= 5e-2 * (1 + 1e-6)
    assert np.ptp(np.log(dt)) > 0.6 * (np.log(5e-2) - np.log(2e-3))
    # B = V^{-1} B0 with B0 real: mapping back with V recovers a real matrix (with conj_sym the
    # kept half plus its conjugate: B0 = 2 Re(V B)).
    b = np.asarray(params["B"], np.float64)
    vb = v @ (b[..., 0] + 1j * b[..., 1])
    if conj_sym:
      b0 = 2 * vb.real
    else:
      assert np.abs(vb.imag).max() < 1e-5
      b0 = vb.real
    assert b0.shape == (p_full, h)
    # lecun normal of shape (P, H): truncated at 2 sigma, std 1/sqrt(P) (fan_in = P)
    assert abs(b0.std() * np.sqrt(p_full) - 1) < 0.1
    assert np.abs(b0).max() <= 2 / 0.87962566103423978 / np.sqrt(p_full) * (1 + 1e-4)
    # C = C0 V: C0 = C V^* where V is square and unitary (conj_sym=False).
    if not conj_sym:
      c = np.asarray(params["C"], np.float64)
      c0 = (c[..., 0] + 1j * c[..., 1]) @ v.conj().T
      assert c0.shape == (1, h, p_full)
      assert abs(np.concatenate([c0.real, c0.imag]).std() * np.sqrt(p_full) - 1) < 0.1
  d = np.asarray(params["D"])
  assert 0.7 < d.std() < 1.3
  for c_init, target in (("lecun_normal", 1 / (p_full * h)), ("complex_normal", 0.5)):
    m = S5(d_model=h, d_state=p_full, blocks=blocks, c_init=c_init, conj_sym=False,
           bidirectional=True)
    c = np.asarray(init(m, jax.random.key(1), x)["params"]["C"], np.float64)
    assert c.shape == (2, h, p_full, 2)
    cc = c[..., 0] + 1j * c[..., 1]
    if c_init == "lecun_normal":
      cc = cc @ v.conj().T  # back to the original basis
    assert abs(np.concatenate([cc.real, cc.imag]).var() / target - 1) < 0.15
    assert rel(cc[0], cc[1]) > 0.5  # the two directions are drawn independently
  assert S5.ssm_param_names == ("Lambda_re", "Lambda_im", "B", "log_dt")


# ----------------------------------------------------------------------------- discretisation


def random_system(rng, p, h, channels=2):
  """A stable diagonal system as numpy complex128, every value representable in float32."""
  # The layer's HiPPO-N init (Re = -1/2, Im up to ~20), imaginary parts moved so no two are equal.
  lam, _ = hippo_n_init(2 * p, 2)
  lam = lam + 1j * rng.uniform(-0.5, 0.5, p)
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), p))
  b = (rng.normal(size=(p, h)) + 1j * rng.normal(size=(p, h))) / np.sqrt(2 * p)
  c = (rng.normal(size=(channels, h, p)) + 1j * rng.normal(size=(channels, h, p))) / np.sqrt(2 * p)
  return tuple(to_f32(a) for a in (lam, dt, b, c))


def dense_discretization(lam, dt, b, method):
  """Abar [P', P'], Bbar [P', H] from dense matrices: the continuous system with a step per state
  is x' = diag(dt) A x + diag(dt) B u over unit time, A = diag(lam)."""
  a_c = np.diag(dt) @ np.diag(lam)
  b_c = np.diag(dt) @ b
  p, h = b.shape
  if method == "zoh":
    # exp([[A, B], [0, 0]]) = [[exp(A), int_0^1 exp(sA) ds B], [0, I]]
    big = np.zeros((p + h, p + h), np.complex128)
    big[:p, :p], big[:p, p:] = a_c, b_c
    e = expm(big)
    return e[:p, :p], e[:p, p:]
  eye = np.eye(p)
  return (np.linalg.solve(eye - a_c / 2, eye + a_c / 2), np.linalg.solve(eye - a_c / 2, b_c))


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretization_matches_dense_formulas(method):
  rng = np.random.default_rng(0)
  lam, dt, b, _ = random_system(rng, 6, 3)
  dt[0] = 1e-5  # |dt Lambda| ~ 1e-5: exp(z) - 1 would cancel in float32
  a_ref, b_ref = dense_discretization(lam, dt, b, method)
  assert rel(a_ref, np.diag(np.diag(a_ref))) < 1e-14  # still diagonal
  with jax.enable_x64(True):
    lb, bb = s5_discretize(jnp.asarray(lam), jnp.asarray(b), jnp.asarray(dt), method)
    assert lb.dtype == jnp.complex128
    assert rel(lb, np.diag(a_ref)) < 1e-13 and rel(bb, b_ref) < 1e-13
  lb, bb = s5_discretize(jnp.asarray(lam, jnp.complex64), jnp.asarray(b, jnp.complex64),
                         jnp.asarray(dt, jnp.float32), method)
  assert lb.dtype == jnp.complex64
  # Lambda_bar to within a few float32 ulps of 1; B_bar to a few ulps per element, the tiny-step
  # row included (relative to its own size).
  assert np.abs(np.asarray(lb) - np.diag(a_ref)).max() < 1.5e-7
  assert np.max(np.abs(np.asarray(bb) - b_ref) / np.abs(b_ref)) < 1e-6
  with pytest.raises(ValueError, match="method must be one of"):
    s5_discretize(jnp.asarray(lam, jnp.complex64), jnp.asarray(b, jnp.complex64),
                  jnp.asarray(dt, jnp.float32), "euler")


# ----------------------------------------------------------------------------- the kernel


def kernels_by_matrix_powers(a_bar, b_bar, c, length, factor=2.0):
  """K[ch, k] = factor * Re(C[ch] Abar^k Bbar), [channels, length, H_out, H_in], float64."""
  out = np.zeros((c.shape[0], length, c.shape[1], b_bar.shape[1]))
  m = b_bar.copy()  # Abar^k Bbar
  for k in range(length):
    out[:, k] = factor * np.real(np.einsum("chp,pi->chi", c, m))
    m = a_bar @ m
  return out


@pytest.mark.parametrize("method,impl", [("zoh", "chunked"), ("bilinear", "reference")])
def test_kernel_via_scan_matches_matrix_powers(method, impl):
  """Impulse responses of the bidirectional system through `s5_ssm` at L = 4096.

  Batch row i < H is an impulse on input channel i at t = 0 (forward kernel K0[t] plus the
  reverse part at t = 0 only); row H + i an impulse at t = L-1 (reverse kernel K1[L-1-t]).
  `chunked` is what "auto" runs on CPU; the associative scan (GPU) is tested against the
  reference in tests/layers/test_scan.py (it compiles too slowly at L = 4096 on this CPU).
  """
  length, p, h = 4096, 8, 3
  lam, dt, b, c = random_system(np.random.default_rng(1), p, h)

  def impulse_responses(a_bar, b_bar):
    k = kernels_by_matrix_powers(a_bar, b_bar, c, length)  # [2, L, H, H]
    ref = np.zeros((2 * h, length, h))
    ref[:h] = np.transpose(k[0], (2, 0, 1))  # y[i, t, :] = K0[t][:, i]
    ref[:h, 0] += k[1, 0].T
    ref[h:] = np.transpose(k[1, ::-1], (2, 0, 1))
    ref[h:, length - 1] += k[0, 0].T
    return ref

  ref = impulse_responses(*dense_discretization(lam, dt, b, method))
  u = np.zeros((2 * h, length, h))
  u[np.arange(h), 0, np.arange(h)] = 1
  u[h + np.arange(h), length - 1, np.arange(h)] = 1

  def run(lam, dt, b, u, c):
    lb, bb = s5_discretize(lam, b, dt, method)
    return s5_ssm(u, lb, bb, c, impl=impl)[0], lb, bb

  with jax.enable_x64(True):
    y64, _, _ = run(*(jnp.asarray(a) for a in (lam, dt, b, u, c)))
    assert y64.dtype == jnp.float64
    err64 = rel(y64, ref)
  y32, lb32, bb32 = run(jnp.asarray(lam, jnp.complex64), jnp.asarray(dt, jnp.float32),
                        jnp.asarray(b, jnp.complex64), jnp.asarray(u, jnp.float32),
                        jnp.asarray(c, jnp.complex64))
  assert y32.dtype == jnp.float32
  err32 = rel(y32, ref)
  print(f"S5 kernel L={length} {method} {impl}: rel err float64 {err64:.2e} float32 {err32:.2e}")
  assert err64 < 1e-8
  # Measured ~1e-6 to 3.5e-6 over seeds. It is dominated by the rounding of Lambda_bar to
  # complex64 (~3e-8), which Lambda_bar^t multiplies by the lag t; the slow modes (dt = 1e-3)
  # keep energy out to t ~ 1e3.
  assert err32 < 1e-5
  # The scan and readout alone: float64 powers of the float32 Lambda_bar, B_bar (~5e-7).
  ref_same_bar = impulse_responses(np.diag(np.asarray(lb32, np.complex128)),
                                   np.asarray(bb32, np.complex128))
  assert rel(y32, ref_same_bar) < 2e-6


# ----------------------------------------------------------------------------- the layer


def numpy_params(params, *, clip_eigs=True, step_rescale=1.0):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  lam_re = np.minimum(p["Lambda_re"], MAX_EIG_REAL) if clip_eigs else p["Lambda_re"]
  return dict(lam=lam_re + 1j * p["Lambda_im"], b=p["B"][..., 0] + 1j * p["B"][..., 1],
              c=p["C"][..., 0] + 1j * p["C"][..., 1], dt=step_rescale * np.exp(p["log_dt"]),
              d=p["D"], w=p["out_proj"]["kernel"], bias=p["out_proj"]["bias"])


def numpy_layer(params, x, *, method="zoh", conj_sym=True, clip_eigs=True, step_rescale=1.0):
  """The full S5 layer in float64 numpy, from the definition (direct sums over the kernels):
    y_t = sum_{s<=t} K0[t-s] u_s + sum_{s>=t} K1[s-t] u_s (bidirectional) + D u_t,
  then exact GELU and the GLU output projection."""
  q = numpy_params(params, clip_eigs=clip_eigs, step_rescale=step_rescale)
  a_bar, b_bar = dense_discretization(q["lam"], q["dt"], q["b"], method)
  u = np.asarray(x, np.float64)
  length = u.shape[1]
  k = kernels_by_matrix_powers(a_bar, b_bar, q["c"], length, 2.0 if conj_sym else 1.0)
  y = q["d"] * u
  for t in range(length):
    for s in range(length):
      if s <= t:
        y[:, t] += u[:, s] @ k[0, t - s].T
      if s >= t and k.shape[0] == 2:
        y[:, t] += u[:, s] @ k[1, s - t].T
  y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # exact GELU
  z = y @ q["w"] + q["bias"]
  return z[..., :H] / (1 + np.exp(-z[..., H:]))  # GLU: a * sigmoid(b)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(discretization="bilinear", c_init="lecun_normal"),
    dict(bidirectional=True, c_init="complex_normal"),
    dict(conj_sym=False, bidirectional=True, discretization="bilinear"),
])
def test_layer_matches_numpy_definition(kw):
  m, params, x = make(seed=1, **kw)
  ref = numpy_layer(params, x, method=m.discretization, conj_sym=m.conj_sym)
  y, cache = apply(m, params, x)
  assert cache is None and y.dtype == jnp.float32
  assert rel(y, ref) < 1e-5
  y_seg, _ = apply(m, params, x, jnp.full(x.shape[:2], 3, jnp.int32))
  assert rel(y_seg, ref) < 1e-5


def stream(m, params, x, sizes, segment_ids=None):
  def check_cache(cache, x):
    assert cache["state"].dtype == jnp.complex64
    assert cache["state"].shape == (x.shape[0], m.n_modes)
  return mixer_testing.stream(apply, m, params, x, sizes, segment_ids, check_cache=check_cache)


def test_scan_equals_streaming_token_and_chunk():
  m, params, x = make(seed=2)
  y_scan, _ = apply(m, params, x)
  y_tok, _ = stream(m, params, x, [1] * L)
  y_chunk, cache = stream(m, params, x, [5, 1, 3, 5, 2])
  assert rel(y_tok, y_scan) < 1e-5
  assert rel(y_chunk, y_scan) < 1e-5
  # The final state is the recurrence x_t = Lambda_bar x_{t-1} + B_bar u_t run in float64.
  q = numpy_params(params)
  a_bar, b_bar = dense_discretization(q["lam"], q["dt"], q["b"], "zoh")
  state = np.zeros((2, m.n_modes), np.complex128)
  for t in range(L):
    state = state @ a_bar.T + np.asarray(x, np.float64)[:, t] @ b_bar.T
  assert rel(cache["state"], state) < 1e-5
  assert (np.asarray(cache["segment_id"]) == -1).all()  # no ids given: the fresh cache's id


def test_causality_by_gradient():
  m, params, x = make(seed=3)
  jac = np.asarray(mixer_testing.max_jacobian(m, params, x))
  assert jac[np.triu_indices(L, 1)].max() == 0.0
  assert (jac[np.tril_indices(L)] > 0).all()
  # The bidirectional layer reads the future: test_bidirectional_segments_equal_separate_documents.


def separate_reference(params, x, **kw):
  """numpy_layer run on each document on its own, concatenated back."""
  return mixer_testing.separate_documents(lambda xd: numpy_layer(params, xd, **kw), x)


def test_segment_resets_equal_separate_documents():
  m, params, x = make(seed=4)
  mixer_testing.check_packed_and_streamed(apply, stream, m, params, x, separate_reference(params, x),
                                          ([5, 2, 1, 3, 5], [3, 3, 5, 5], [1] * L))


def test_bidirectional_segments_equal_separate_documents():
  m, params, x = make(seed=5, bidirectional=True)
  seg = mixer_testing.two_documents(L)
  y_packed, _ = apply(m, params, x, seg)
  assert rel(y_packed, separate_reference(params, x)) < 1e-5
  mixer_testing.check_documents_do_not_mix(m, params, x, seg)


def test_bidirectional_cannot_stream():
  m, params, x = make(bidirectional=True)
  with pytest.raises(ValueError, match=r"S5\(bidirectional=True\) cannot stream"):
    m.init_cache(2, jnp.float32)
  cache = S5(d_model=H, d_state=NSTATE, blocks=NBLOCKS).init_cache(2, jnp.float32)
  with pytest.raises(ValueError, match=r"S5\(bidirectional=True\) cannot stream"):
    m.apply(params, x, cache=cache)


def test_step_rescale_equals_scaled_dt():
  m, params, x = make(seed=6)
  scale = 2.5
  y_rescaled, _ = apply(S5(d_model=H, d_state=NSTATE, blocks=NBLOCKS, step_rescale=scale),
                        params, x)
  shifted = jax.tree.map(lambda a: a, params)
  shifted["params"]["log_dt"] = params["params"]["log_dt"] + np.log(scale)
  y_shifted, _ = apply(m, shifted, x)
  assert rel(y_rescaled, y_shifted) < 1e-5
  assert rel(y_rescaled, numpy_layer(params, x, step_rescale=scale)) < 1e-5
  assert rel(y_rescaled, apply(m, params, x)[0]) > 1e-2  # the factor matters


def test_eigenvalue_clipping():
  m, params, x = make(seed=7)
  m_free = S5(d_model=H, d_state=NSTATE, blocks=NBLOCKS, clip_eigs=False)
  bad = jax.tree.map(lambda a: a, params)
  lam_re = np.asarray(params["params"]["Lambda_re"]).copy()
  lam_re[[0, 3]] = [0.3, -1e-6]  # unstable, and stable but above the bound
  bad["params"]["Lambda_re"] = jnp.asarray(lam_re)
  log_dt = np.asarray(params["params"]["log_dt"]).copy()
  log_dt[[0, 3]] = 0.0  # dt = 1: growth exp(0.3 t) of mode 0 if it were not clipped
  bad["params"]["log_dt"] = jnp.asarray(log_dt)
  clipped = jax.tree.map(lambda a: a, bad)
  clipped["params"]["Lambda_re"] = jnp.asarray(np.minimum(lam_re, -1e-4))
  y, _ = apply(m, bad, x)
  assert rel(y, apply(m, clipped, x)[0]) < 1e-6
  assert rel(y, numpy_layer(bad, x)) < 1e-5
  y_free, _ = apply(m_free, bad, x)
  assert rel(y_free, numpy_layer(bad, x, clip_eigs=False)) < 1e-5
  assert rel(y_free, y) > 1e-3  # clipping changed the function
  # A clipped entry gets no gradient; the unclipped ones do.
  g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x)[0] ** 2)))(bad)["params"]["Lambda_re"]
  g = np.asarray(g)
  assert g[0] == 0.0 and g[3] == 0.0 and (np.abs(np.delete(g, [0, 3])) > 0).all()
  # Over a long sequence the clipped layer stays bounded.
  y_long = np.asarray(apply(m, bad, randn(8, (1, 512, H)))[0])
  assert np.isfinite(y_long).all() and np.abs(y_long).max() < 1e3


def test_conj_sym_equals_full_spectrum_with_conjugates():
  """conj_sym=True with P/2 modes and y = 2 Re(C x) is the conj_sym=False layer whose P modes are
  the kept ones followed by their conjugates (Lambda, B, C conjugated, dt repeated)."""
  m, params, x = make(seed=9, bidirectional=True)
  full = jax.tree.map(lambda a: a, params)
  q = params["params"]
  full["params"]["Lambda_re"] = jnp.concatenate([q["Lambda_re"], q["Lambda_re"]])
  full["params"]["Lambda_im"] = jnp.concatenate([q["Lambda_im"], -q["Lambda_im"]])
  full["params"]["log_dt"] = jnp.concatenate([q["log_dt"], q["log_dt"]])
  full["params"]["B"] = jnp.concatenate([q["B"], q["B"] * jnp.array([1.0, -1.0])], axis=0)
  full["params"]["C"] = jnp.concatenate([q["C"], q["C"] * jnp.array([1.0, -1.0])], axis=2)
  m_full = S5(d_model=H, d_state=NSTATE, blocks=NBLOCKS, conj_sym=False, bidirectional=True)
  y_full, _ = apply(m_full, full, x)
  y, _ = apply(m, params, x)
  assert rel(y_full, y) < 1e-6
  # Without the conjugate half's output (its C zeroed) the function is another one: the factor 2.
  half = jax.tree.map(lambda a: a, full)
  half["params"]["C"] = full["params"]["C"].at[:, :, m.n_modes:].set(0.0)
  assert rel(apply(m_full, half, x)[0], y) > 1e-2


@pytest.mark.parametrize("kw,segments", [
    (dict(), False),
    (dict(discretization="bilinear", bidirectional=True, conj_sym=False), True),
])
def test_gradients_match_finite_differences_float64(kw, segments):
  length = 6
  m = S5(d_model=2, d_state=4, **kw)
  x32 = randn(10, (1, length, 2))
  params32 = init(m, jax.random.key(3), x32)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1]], jnp.int32) if segments else None
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)
    x = jnp.asarray(x32, jnp.float64)
    cot = jnp.asarray(np.random.default_rng(11).standard_normal((1, length, 2)))
    flat, unravel = ravel_pytree(params)
    assert flat.dtype == jnp.float64

    def loss(v):
      y, _ = m.apply(unravel(v), x, segment_ids=seg)
      assert y.dtype == jnp.float64
      return jnp.sum(y * cot)

    grad = np.asarray(jax.jit(jax.grad(loss))(flat))
    eps = 1e-6
    steps = eps * jnp.eye(flat.size, dtype=jnp.float64)
    losses = jax.jit(jax.vmap(loss))
    fd = np.asarray((losses(flat + steps) - losses(flat - steps)) / (2 * eps))
  assert np.isfinite(grad).all()
  # Every parameter (leaf) gets a gradient that matches, and none is identically zero.
  for name, g_leaf, fd_leaf in zip(
      [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params32)],
      jax.tree.leaves(unravel(jnp.asarray(grad))), jax.tree.leaves(unravel(jnp.asarray(fd)))):
    assert np.abs(np.asarray(g_leaf)).max() > 0, name
    assert rel(g_leaf, fd_leaf) < 1e-6, name


def test_bad_fields_raise_clear_errors():
  x = jnp.ones((1, 4, 3))
  for kw, msg in ((dict(c_init="foo"), "S5.c_init='foo'"),
                  (dict(discretization="euler"), "S5.discretization='euler'"),
                  (dict(activation="bar"), "S5.activation='bar'"),
                  (dict(d_state=6, blocks=2), "S5: d_state=6 must split into blocks=2"),
                  (dict(step_rescale=0.0), "S5.step_rescale must be > 0"),
                  (dict(dt_min=0.1, dt_max=0.01), "0 < dt_min <= dt_max")):
    with pytest.raises(ValueError, match=msg):
      S5(d_model=3, **{"d_state": 8, **kw}).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"needs x \[batch, length, 3\]"):
    S5(d_model=3, d_state=8).init(jax.random.key(0), jnp.ones((1, 4, 5)))


def test_bf16_input_and_dropout():
  m, params, x = make(seed=12)
  y, _ = apply(m, params, x)
  y16, _ = apply(m, params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert rel(y16, y) < 2e-2  # bf16 input rounding plus a bf16 output projection
  md = S5(d_model=H, d_state=NSTATE, blocks=NBLOCKS, dropout=0.5, deterministic=False)
  run = jax.jit(lambda key: md.apply(params, x, rngs={"dropout": key})[0])
  assert rel(run(jax.random.key(0)), run(jax.random.key(1))) > 1e-2
