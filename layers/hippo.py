"""HiPPO transition matrices and their normal-plus-low-rank (NPLR) diagonalisation.

HiPPO (Gu, Dao, Ermon, Rudra, Re 2020) projects the history of a signal u onto N orthonormal
basis functions under a measure; the coefficients x(t) in R^N follow the linear ODE

    x'(t) = A x(t) + B u(t)            (A [N, N], B [N]; LegS carries an extra 1/t, see below)

S4 (Gu, Goel, Re 2022) rewrites A as normal plus low rank, A = V Lambda V^* - P^T P, and keeps
Lambda, V^* P and V^* B as the trainable DPLR parameters. Conventions here (n, k = 0 .. N-1, row n,
column k; r_n = sqrt(2n + 1)):

  legs  scaled Legendre, measure uniform on [0, t] (the ODE is x' = (1/t)(A x + B u); S4 uses A
        time-invariantly):
            A[n, k] = -r_n r_k  (n > k),  -(n + 1)  (n = k),  0  (n < k);   B[n] = r_n.
  legt  translated Legendre, window [t - theta, t] with theta = 1, basis r_n P_n(2(s - t) + 1)
        (exact for inputs that are polynomials of degree < N on the window):
            A[n, k] = -r_n r_k  (n >= k),  -r_n r_k (-1)^(n-k)  (n < k);   B[n] = r_n.
        (The S4 repository's "legt" is this matrix times 1/2, i.e. theta = 2.)
  lagt  translated Laguerre with the orthonormal Laguerre functions L_n(t - s) exp(-(t - s)/2),
        as the S4 repository's "lagt" (beta = 1):
            A[n, k] = -1  (n > k),  -1/2  (n = k),  0  (n < k);   B[n] = 1.
        (The HiPPO paper's weight exp(-(t - s)) gives this A minus I/2.)
  fout  translated Fourier, exactly the S4 repository's measure "fourier" (N even): with
        e = [1, 0, sqrt 2, 0, sqrt 2, 0, ...] (e[0] = 1, e[2j] = sqrt 2, odd entries 0),
            A = pi * (Q - Q^T) - e e^T,  Q[2j+1, 2j] = j  (the only non-zero entries of Q);
            B = e.
        Pairs (2j, 2j+1) are the (cos, sin) coefficients of frequency j; the rank-one term is the
        contribution of the window's other endpoint.

Every one of these is "c I + skew + low rank": A + P^T P = c I + S with S^T = -S and c = -1/2 for
LegS, 0 for the others, P = `low_rank_correction(measure, N, rank)`:
  legs  P = [sqrt(n + 1/2)]                   (rank 1)
  legt  P = [r_n [n odd], r_n [n even]]       (rank 2: the symmetric part of LegT is -P^T P)
  lagt  P = [1/sqrt 2, ..., 1/sqrt 2]         (rank 1)
  fout  P = [e]                               (rank 1)
Extra rows (rank above the natural one) are zero; a rank below it raises.

`nplr` therefore diagonalises the normal part through the Hermitian matrix -i S (numpy `eigh`):
real eigenvalues mu, orthonormal eigenvectors, Lambda = c + i mu. The spectrum of a real skew
matrix comes in pairs +-mu; of each pair only the mode with Im(Lambda) > 0 is kept (N/2 modes,
sorted by increasing Im(Lambda)). Zero eigenvalues (FouT's constant and dead sine pair) have an
even multiplicity for even N; their null space is given a real orthonormal basis q_1, q_2, ... and
paired into the complex vectors (q_1 + i q_2) / sqrt 2, whose conjugates are the dropped modes, so
V_full = [V, conj(V)] is unitary in every case and

    A = 2 Re(V diag(Lambda) V^*) - P0^T P0,   P0^T = 2 Re(V P^T),   B0 = 2 Re(V B)

with P0, B0 the real original-basis vectors. nplr needs an even N.
"""

from __future__ import annotations

import numpy as np

MEASURES = ("legs", "legt", "lagt", "fout")
# Rank of the correction that makes each measure's A normal (see the module docstring).
_NATURAL_RANK = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1}
# The multiple of I in the normal part A + P^T P = c I + skew.
_NORMAL_SHIFT = {"legs": -0.5, "legt": 0.0, "lagt": 0.0, "fout": 0.0}


def _check(measure: str, N: int) -> None:
  if measure not in MEASURES:
    raise ValueError(f"HiPPO measure={measure!r} is not one of {list(MEASURES)}")
  if not isinstance(N, (int, np.integer)) or N < 1:
    raise ValueError(f"HiPPO N must be a positive integer, got N={N!r}")
  if measure == "fout" and N % 2:
    raise ValueError(f"HiPPO measure='fout' needs an even N (cos/sin pairs), got N={N}")


def _fout_endpoint(N: int) -> np.ndarray:
  e = np.zeros(N)
  e[0::2] = np.sqrt(2.0)
  e[0] = 1.0
  return e


def transition(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
  """Continuous HiPPO operator (A [N, N], B [N]), float64, for x' = A x + B u.

  measure: "legs" | "legt" | "lagt" | "fout"; the formulas are in the module docstring.
  """
  _check(measure, N)
  n = np.arange(N, dtype=np.float64)
  row, col = n[:, None], n[None, :]
  if measure == "legs":
    r = np.sqrt(2 * n + 1)
    A = -np.where(row > col, np.outer(r, r), 0.0) - np.diag(n + 1)
    B = r.copy()
  elif measure == "legt":
    r = np.sqrt(2 * n + 1)
    sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
    A = -np.outer(r, r) * sign
    B = r.copy()
  elif measure == "lagt":
    A = 0.5 * np.eye(N) - np.tril(np.ones((N, N)))
    B = np.ones(N)
  else:  # fout
    q = np.zeros((N, N))
    j = np.arange(N // 2)
    q[2 * j + 1, 2 * j] = j
    e = _fout_endpoint(N)
    A = np.pi * (q - q.T) - np.outer(e, e)
    B = e.copy()
  return A, B


def low_rank_correction(measure: str, N: int, rank: int = 1) -> np.ndarray:
  """P [rank, N] float64 with A + P^T P = c I + skew (c = -1/2 for LegS, else 0).

  Rows beyond the measure's natural rank (LegT 2, the others 1) are zero. A smaller rank raises.
  """
  _check(measure, N)
  natural = _NATURAL_RANK[measure]
  if not isinstance(rank, (int, np.integer)) or rank < natural:
    raise ValueError(f"HiPPO measure={measure!r} needs rank >= {natural} for its normal-plus-"
                     f"low-rank form, got rank={rank!r}")
  n = np.arange(N, dtype=np.float64)
  if measure == "legs":
    rows = [np.sqrt(n + 0.5)]
  elif measure == "legt":
    r = np.sqrt(2 * n + 1)
    rows = [np.where(n % 2 == 1, r, 0.0), np.where(n % 2 == 0, r, 0.0)]
  elif measure == "lagt":
    rows = [np.full(N, np.sqrt(0.5))]
  else:
    rows = [_fout_endpoint(N)]
  P = np.zeros((rank, N))
  P[:natural] = np.stack(rows)
  return P


def _conjugate_pair_basis(null: np.ndarray, tol: float) -> np.ndarray:
  """Complex orthonormal vectors (q1 + i q2)/sqrt 2 spanning half of a conjugation-closed space.

  null: [N, m] complex orthonormal basis of a space closed under conjugation (m even).
  Returns [N, m/2] W with [W, conj W] an orthonormal basis of the same space.
  """
  m = null.shape[1]
  # The space is spanned by the real and imaginary parts; take a real orthonormal basis of them.
  u, s, _ = np.linalg.svd(np.concatenate([null.real, null.imag], axis=1), full_matrices=False)
  if np.sum(s > tol) != m:
    raise np.linalg.LinAlgError("nplr: the zero-eigenvalue space is not conjugation-closed")
  q = u[:, :m]
  return (q[:, 0::2] + 1j * q[:, 1::2]) / np.sqrt(2.0)


def nplr(measure: str, N: int,
         rank: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Normal-plus-low-rank form of the HiPPO matrix, diagonalised, keeping half the modes.

  Returns (Lambda [N/2] complex128, P [rank, N/2] complex128, B [N/2] complex128,
  V [N, N/2] complex128) with Im(Lambda) >= 0 ascending, P = (V^* P0^T)^T, B = V^* B0 and

      A = V_full diag(Lambda_full) V_full^* - P0^T P0,   V_full = [V, conj V] unitary,
      Lambda_full = [Lambda, conj Lambda],   i.e.  A = 2 Re(V diag(Lambda) V^*) - P0^T P0,

  where P0 = low_rank_correction(measure, N, rank) and (A, B0) = transition(measure, N).
  In the eigenbasis the real N-dim system is the conjugate-symmetric complex one with state
  [x, conj x]; see the module docstring for the handling of zero eigenvalues. N must be even.
  """
  _check(measure, N)
  if N % 2:
    raise ValueError(f"nplr needs an even N (modes are kept in conjugate pairs), got N={N}")
  A, B0 = transition(measure, N)
  P0 = low_rank_correction(measure, N, rank)
  c = _NORMAL_SHIFT[measure]
  S = A + P0.T @ P0 - c * np.eye(N)
  scale = max(1.0, float(np.abs(S).max()))
  if np.abs(S + S.T).max() > 1e-12 * scale:
    raise AssertionError(f"nplr({measure!r}): A + P^T P - c I is not skew-symmetric")
  S = 0.5 * (S - S.T)
  # -i S is Hermitian: eigh gives real mu and orthonormal vectors even for clustered spectra,
  # where a general eigensolver on A would return ill-conditioned vectors.
  mu, U = np.linalg.eigh(-1j * S)  # S U = i mu U
  tol = 1e3 * N * np.finfo(np.float64).eps * scale
  pos, zero = mu > tol, np.abs(mu) <= tol
  if np.sum(pos) != np.sum(mu < -tol) or np.sum(zero) % 2:
    raise np.linalg.LinAlgError(f"nplr({measure!r}, N={N}): spectrum is not in +-pairs")
  parts, lams = [], []
  if np.any(zero):
    W = _conjugate_pair_basis(U[:, zero], tol=0.5)
    parts.append(W)
    lams.append(np.zeros(W.shape[1]))
  parts.append(U[:, pos])  # eigh sorts mu ascending
  lams.append(mu[pos])
  V = np.concatenate(parts, axis=1)
  Lambda = c + 1j * np.concatenate(lams)
  assert V.shape == (N, N // 2)
  P = (V.conj().T @ P0.T.astype(np.complex128)).T
  B = V.conj().T @ B0.astype(np.complex128)
  return Lambda, P, B, V
