"""Tests for layers/hippo.py: closed forms, the projection ODEs they come from, the NPLR form."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre

from layers.hippo import MEASURES, low_rank_correction, nplr, transition


def rel(out, ref) -> float:
  err = np.linalg.norm(np.asarray(out) - np.asarray(ref)) / np.linalg.norm(ref)
  assert np.isfinite(err)
  return float(err)


# ------------------------------------------------------------------ closed forms, elementwise


def closed_form(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
  """The published formulas, entry by entry (deliberately loop-based, unlike the module)."""
  A, B = np.zeros((N, N)), np.zeros(N)
  for n in range(N):
    for k in range(N):
      rn, rk = np.sqrt(2 * n + 1), np.sqrt(2 * k + 1)
      if measure == "legs":  # HiPPO-LegS (S4 paper eq. 2)
        A[n, k] = -rn * rk if n > k else (-(n + 1) if n == k else 0.0)
      elif measure == "legt":  # HiPPO-LegT, theta = 1
        A[n, k] = -rn * rk if n >= k else -rn * rk * (-1) ** (n - k)
      elif measure == "lagt":
        A[n, k] = -1.0 if n > k else (-0.5 if n == k else 0.0)
      elif measure == "fout":
        end = lambda i: 1.0 if i == 0 else (np.sqrt(2) if i % 2 == 0 else 0.0)  # noqa: E731
        rot = 0.0
        if n % 2 == 1 and k == n - 1:
          rot = np.pi * (n // 2)
        if k % 2 == 1 and n == k - 1:
          rot = -np.pi * (k // 2)
        A[n, k] = rot - end(n) * end(k)
    B[n] = {"legs": np.sqrt(2 * n + 1), "legt": np.sqrt(2 * n + 1), "lagt": 1.0,
            "fout": 1.0 if n == 0 else (np.sqrt(2) if n % 2 == 0 else 0.0)}[measure]
  return A, B


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [1, 2, 5, 8])
def test_transition_matches_closed_form(measure, N):
  if measure == "fout" and N % 2:
    with pytest.raises(ValueError, match="'fout' needs an even N"):
      transition(measure, N)
    return
  A, B = transition(measure, N)
  A_ref, B_ref = closed_form(measure, N)
  assert A.shape == (N, N) and B.shape == (N,) and A.dtype == B.dtype == np.float64
  np.testing.assert_allclose(A, A_ref, rtol=1e-14, atol=1e-14)
  np.testing.assert_allclose(B, B_ref, rtol=1e-14, atol=1e-14)


def test_small_matrices_written_out():
  # Written out by hand from the formulas for N = 3 (legs) and N = 4 (fout).
  s3, s5, s15 = np.sqrt(3), np.sqrt(5), np.sqrt(15)
  A, B = transition("legs", 3)
  np.testing.assert_allclose(A, [[-1, 0, 0], [-s3, -2, 0], [-s5, -s15, -3]], rtol=1e-14)
  np.testing.assert_allclose(B, [1, s3, s5], rtol=1e-14)
  A, B = transition("legt", 3)
  np.testing.assert_allclose(A, [[-1, s3, -s5], [-s3, -3, s15], [-s5, -s15, -5]], rtol=1e-14)
  r2, pi = np.sqrt(2), np.pi
  A, B = transition("fout", 4)
  np.testing.assert_allclose(A, [[-1, 0, -r2, 0], [0, 0, 0, 0], [-r2, 0, -2, -pi],
                                 [0, 0, pi, 0]], rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(B, [1, 0, r2, 0], rtol=1e-14)


# ------------------------------------------------------------------ the ODEs behind the matrices

GL_X, GL_W = legendre.leggauss(80)
GL_X, GL_W = 0.5 * (GL_X + 1), 0.5 * GL_W  # Gauss-Legendre on [0, 1]


def basis(N):
  """g_n(x) = sqrt(2n+1) P_n(2x - 1) at the quadrature nodes: [N, nodes], orthonormal on [0,1]."""
  return np.stack([np.sqrt(2 * n + 1) * legendre.legval(2 * GL_X - 1, np.eye(N)[n])
                   for n in range(N)])


def test_legs_is_the_scaled_legendre_projection_ode():
  # c_n(t) = int_0^1 f(t x) g_n(x) dx; then t c'(t) = A c + B f(t) for any f (no approximation).
  N, t = 8, 1.3
  f = lambda s: np.cos(3 * s) + s ** 2  # noqa: E731
  df = lambda s: -3 * np.sin(3 * s) + 2 * s  # noqa: E731
  g = basis(N)
  c = g @ (GL_W * f(t * GL_X))
  dc = g @ (GL_W * GL_X * df(t * GL_X))
  A, B = transition("legs", N)
  assert rel(A @ c + B * f(t), t * dc) < 1e-12


def test_legt_is_the_sliding_window_legendre_projection_ode():
  # c_n(t) = int_0^1 f(t - 1 + x) g_n(x) dx over the window [t-1, t]; exact for polynomials of
  # degree < N, whose value at the far end t-1 is reconstructed exactly from c.
  N, t = 8, 0.7
  poly = np.random.default_rng(0).normal(size=N)  # degree N - 1
  f = lambda s: np.polyval(poly, s)  # noqa: E731
  df = lambda s: np.polyval(np.polyder(poly), s)  # noqa: E731
  g = basis(N)
  c = g @ (GL_W * f(t - 1 + GL_X))
  dc = g @ (GL_W * df(t - 1 + GL_X))
  A, B = transition("legt", N)
  assert rel(A @ c + B * f(t), dc) < 1e-12
  # A degree-N input is not exactly represented: the identity must then fail (the test can fail).
  poly2 = np.concatenate([[1.0], poly])
  c2 = g @ (GL_W * np.polyval(poly2, t - 1 + GL_X))
  dc2 = g @ (GL_W * np.polyval(np.polyder(poly2), t - 1 + GL_X))
  assert rel(A @ c2 + B * np.polyval(poly2, t), dc2) > 1e-5


def test_lagt_is_the_laguerre_function_projection_ode():
  # For f(s) = exp(b s): c_n(t) = int_0^inf f(t - x) L_n(x) exp(-x/2) dx
  #                             = exp(b t) (b - 1/2)^n / (b + 1/2)^(n+1)  (Laplace transform)
  # and c' = b c must equal A c + B f(t).
  N, b, t = 10, 0.3, 0.4
  c = np.exp(b * t) * (b - 0.5) ** np.arange(N) / (b + 0.5) ** (np.arange(N) + 1)
  A, B = transition("lagt", N)
  assert rel(A @ c + B * np.exp(b * t), b * c) < 1e-13


# ------------------------------------------------------------------ low-rank correction, NPLR


def measure_ranks():
  return [(m, r) for m in MEASURES for r in ((2, 3) if m == "legt" else (1, 2))]


@pytest.mark.parametrize("measure,rank", measure_ranks())
def test_low_rank_correction_makes_A_normal(measure, rank):
  N = 12
  A, _ = transition(measure, N)
  P = low_rank_correction(measure, N, rank)
  assert P.shape == (rank, N)
  M = A + P.T @ P
  shift = -0.5 if measure == "legs" else 0.0
  S = M - shift * np.eye(N)
  np.testing.assert_allclose(S, -S.T, atol=1e-12)  # c I + skew
  np.testing.assert_allclose(M @ M.T, M.T @ M, atol=1e-9 * np.abs(M).max() ** 2)  # normal
  assert np.abs(M @ A.T - A.T @ M).max() > 1e-3  # while A itself is far from normal


def test_low_rank_correction_rejects_too_small_rank():
  with pytest.raises(ValueError, match="measure='legt' needs rank >= 2"):
    low_rank_correction("legt", 8, 1)
  with pytest.raises(ValueError, match="measure='legs' needs rank >= 1"):
    nplr("legs", 8, 0)
  with pytest.raises(ValueError, match="measure='legx' is not one of"):
    transition("legx", 4)
  with pytest.raises(ValueError, match="nplr needs an even N"):
    nplr("legs", 7)


@pytest.mark.parametrize("measure,rank", measure_ranks())
@pytest.mark.parametrize("N", [2, 8, 64])
def test_nplr_reconstructs_A_and_B(measure, rank, N):
  A, B0 = transition(measure, N)
  P0 = low_rank_correction(measure, N, rank)
  Lam, P, B, V = nplr(measure, N, rank)
  assert Lam.shape == (N // 2,) and P.shape == (rank, N // 2) and B.shape == (N // 2,)
  assert V.shape == (N, N // 2)
  assert all(a.dtype == np.complex128 for a in (Lam, P, B, V))
  V_full = np.concatenate([V, V.conj()], axis=1)
  np.testing.assert_allclose(V_full.conj().T @ V_full, np.eye(N), atol=1e-12)
  # The kept half: Im(Lambda) >= 0 ascending; conjugates are the other half.
  assert (Lam.imag >= 0).all() and (np.diff(Lam.imag) >= 0).all()
  np.testing.assert_allclose(Lam.real, -0.5 if measure == "legs" else 0.0, atol=1e-12)
  # A = V_full diag(Lambda_full) V_full^* - P0^T P0, with P and B in the eigenbasis.
  lam_full = np.concatenate([Lam, Lam.conj()])
  normal = V_full @ np.diag(lam_full) @ V_full.conj().T
  assert np.abs(normal.imag).max() <= 1e-12 * np.abs(normal).max()
  assert rel(normal.real - P0.T @ P0, A) < 1e-13
  assert rel(2 * np.real(V @ np.diag(Lam) @ V.conj().T) - P0.T @ P0, A) < 1e-13
  assert rel(2 * np.real(V @ P.T), P0.T) < 1e-13
  assert rel(2 * np.real(V @ B), B0) < 1e-13
  # In the eigenbasis, the full conjugate-symmetric DPLR matrix is V_full^* A V_full.
  p_full = np.concatenate([P, P.conj()], axis=1).T  # [N, rank]
  dplr = np.diag(lam_full) - p_full @ p_full.conj().T
  assert rel(V_full @ dplr @ V_full.conj().T, A) < 1e-13
  # Eigenvalues of the normal part from a general solver agree.
  ev = np.linalg.eigvals(A + P0.T @ P0)
  by_imag = lambda z: z[np.argsort(z.imag, kind="stable")]  # noqa: E731
  np.testing.assert_allclose(by_imag(ev), by_imag(lam_full), atol=1e-9 * N)


def test_fout_zero_modes_are_paired():
  # FouT's normal part has a double zero eigenvalue (the constant and the dead sine); it is kept
  # as one complex mode (q1 + i q2)/sqrt 2 whose conjugate is the dropped one.
  Lam, _, _, V = nplr("fout", 6)
  assert abs(Lam[0]) < 1e-14 and np.all(np.abs(Lam[1:]) > 1)
  np.testing.assert_allclose(np.abs(V[:2, 0]) ** 2, [0.5, 0.5], atol=1e-14)
  np.testing.assert_allclose(np.abs(V[2:, 0]), 0, atol=1e-14)
