"""layers.scan: every implementation against an independent float64 numpy loop.

The numpy reference runs h_t = a_t*h_{t-1} + b_t token by token and its gradient is the adjoint
recurrence written out by hand, in the real-gradient convention (dL/dx + i dL/dy for a complex
input). JAX's grad of a real loss w.r.t. a complex input is the conjugate of that, so complex
gradients are compared after conjugation.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import scan
from tests.numerics import rel as rel_err

IMPLS = sorted(scan.IMPLEMENTATIONS)
DTYPES = ["float32", "float64", "complex64", "complex128"]
# float32 paths within 1e-5 of a float64 reference (DESIGN.md); float64 paths agree to rounding.
TOL = {"float32": 1e-5, "complex64": 1e-5, "float64": 1e-12, "complex128": 1e-12}


# ---------------------------------------------------------------------------------------------
# Independent numpy float64 reference.

def _resets(segment_ids: np.ndarray | None, batch: int, length: int, reverse: bool) -> np.ndarray:
  """[batch, length] bool: token t drops the state handed to it by the previous token in scan
  order because the document changes there."""
  reset = np.zeros((batch, length), bool)
  if segment_ids is not None:
    for t in range(length):
      prev = t + 1 if reverse else t - 1
      if 0 <= prev < length:
        reset[:, t] = segment_ids[:, t] != segment_ids[:, prev]
  return reset


def _effective_decay(a, b, segment_ids, reverse):
  a_eff = np.array(np.broadcast_to(a, b.shape))
  reset = _resets(segment_ids, b.shape[0], b.shape[1], reverse)
  a_eff[reset] = 0
  return a_eff, reset


def np_scan(a, b, h0, segment_ids=None, reverse=False):
  """Returns (h, final, h_prev) with h_prev[:, t] the state entering token t."""
  a, b, h0 = (np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
              for x in (a, b, h0))
  dtype = np.result_type(a, b, h0)
  a_eff, _ = _effective_decay(a, b, segment_ids, reverse)
  h = np.zeros(b.shape, dtype)
  h_prev = np.zeros(b.shape, dtype)
  state = np.array(h0, dtype)
  order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
  for t in order:
    h_prev[:, t] = state
    state = a_eff[:, t] * state + b[:, t]
    h[:, t] = state
  return h, state, h_prev


def np_scan_grad(a, b, h0, segment_ids, reverse, g_h, g_final):
  """Real-convention gradients (da, db, dh0) of sum Re(conj(g_h) h) + sum Re(conj(g_final) hT)."""
  a = np.asarray(a)
  _, _, h_prev = np_scan(a, b, h0, segment_ids, reverse)
  a_eff, reset = _effective_decay(np.asarray(a, h_prev.dtype), np.asarray(b), segment_ids, reverse)
  lam = np.array(g_final, h_prev.dtype)
  da = np.zeros(h_prev.shape, h_prev.dtype)
  db = np.zeros(h_prev.shape, h_prev.dtype)
  order = range(b.shape[1]) if reverse else range(b.shape[1] - 1, -1, -1)  # backwards in time
  for t in order:
    lam = lam + g_h[:, t]
    db[:, t] = lam
    da[:, t] = lam * np.conj(h_prev[:, t])
    lam = np.conj(a_eff[:, t]) * lam
  da[reset] = 0  # where the document changes a_t is not used
  summed = tuple(i for i, n in enumerate(a.shape) if n == 1 and b.shape[i] != 1)
  return da.sum(axis=summed, keepdims=True), db, lam


# ---------------------------------------------------------------------------------------------
# Helpers.

def x64(dtype: str):
  return jax.enable_x64(True) if dtype in ("float64", "complex128") else contextlib.nullcontext()


def random_inputs(rng, b_shape, dtype, a_shape=None):
  """Decays |a| in (0.5, 1) (with a random phase if complex), normal b and initial state."""
  a_shape = b_shape if a_shape is None else a_shape
  state_shape = b_shape[:1] + b_shape[2:]
  a = rng.uniform(0.5, 1.0, a_shape)
  b = rng.normal(size=b_shape)
  h0 = rng.normal(size=state_shape)
  if dtype.startswith("complex"):
    a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, a_shape))
    b = b + 1j * rng.normal(size=b_shape)
    h0 = h0 + 1j * rng.normal(size=state_shape)
  return a.astype(dtype), b.astype(dtype), h0.astype(dtype)


def random_segments(rng, batch, length):
  """[batch, length] ids with 2-4 documents of irregular lengths per row; ids are arbitrary
  labels (unsorted, and an id may come back after another document)."""
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(1, 4), replace=False))
    labels = rng.permutation([7, 3, 7, 11])  # 7 twice: a repeated id after a change is new
    for k, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length])):
      ids[row, lo:hi] = labels[k]
  return ids


def run_and_grad(fn, a, b, h0, w, v, **kwargs):
  """(h, final) and JAX's gradient of sum Re(conj(w) h) + sum Re(conj(v) final) w.r.t. a, b, h0."""
  def loss(a, b, h0):
    h, final = fn(a, b, initial_state=h0, **kwargs)
    value = jnp.sum(jnp.real(jnp.conj(w) * h)) + jnp.sum(jnp.real(jnp.conj(v) * final))
    return value, (h, final)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(a, b, h0)
  return out, grads


def check_against_numpy(fn, a, b, h0, tol, segment_ids=None, reverse=False, **kwargs):
  rng = np.random.default_rng(1)
  w = rng.normal(size=b.shape).astype(b.dtype)
  v = rng.normal(size=h0.shape).astype(b.dtype)
  (h, final), (da, db, dh0) = run_and_grad(
      fn, a, b, h0, w, v, segment_ids=segment_ids, reverse=reverse, **kwargs)
  h_ref, final_ref, _ = np_scan(a, b, h0, segment_ids, reverse)
  grads_ref = np_scan_grad(a, b, h0, segment_ids, reverse, w, v)
  assert h.shape == b.shape and final.shape == h0.shape
  assert h.dtype == final.dtype == np.result_type(a.dtype, b.dtype, h0.dtype)
  assert da.shape == a.shape and db.shape == b.shape and dh0.shape == h0.shape
  errors = {"h": rel_err(h, h_ref), "final": rel_err(final, final_ref)}
  for name, g, g_ref in zip(("da", "db", "dh0"), (da, db, dh0), grads_ref):
    errors[name] = rel_err(np.conj(g), g_ref)  # JAX's complex gradient is the conjugate
  assert max(errors.values()) < tol, errors


# ---------------------------------------------------------------------------------------------
# Tests.

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_numpy_with_segments_and_initial_state(impl, dtype, reverse):
  rng = np.random.default_rng(0)
  a, b, h0 = random_inputs(rng, (3, 37, 5), dtype)
  segment_ids = random_segments(rng, 3, 37)
  kwargs = {"chunk_size": 8} if impl == "chunked" else {}  # 37 is not a multiple of 8
  with x64(dtype):
    check_against_numpy(scan.IMPLEMENTATIONS[impl], a, b, h0, TOL[dtype],
                        segment_ids=segment_ids, reverse=reverse, **kwargs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_numpy_without_segments(impl, reverse):
  rng = np.random.default_rng(2)
  a, b, h0 = random_inputs(rng, (2, 50, 2, 3), "float32")  # two feature axes
  check_against_numpy(scan.IMPLEMENTATIONS[impl], a, b, h0, 1e-5, reverse=reverse)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 16, 37, 64])
def test_chunked_any_chunk_size(chunk_size):
  rng = np.random.default_rng(chunk_size)
  a, b, h0 = random_inputs(rng, (2, 37, 4), "float32")
  check_against_numpy(scan.linear_scan_chunked, a, b, h0, 1e-5, reverse=chunk_size % 2 == 1,
                      chunk_size=chunk_size)


@pytest.mark.parametrize("a_shape", [(3, 29, 1), (1, 29, 4), (3, 1, 4), (1, 29, 1)])
@pytest.mark.parametrize("impl", IMPLS)
def test_broadcast_decay(impl, a_shape):
  rng = np.random.default_rng(3)
  a, b, h0 = random_inputs(rng, (3, 29, 4), "float32", a_shape=a_shape)
  # Without segment ids `a` reaches the implementation still broadcast; with them it is not.
  check_against_numpy(scan.IMPLEMENTATIONS[impl], a, b, h0, 1e-5)
  check_against_numpy(scan.IMPLEMENTATIONS[impl], a, b, h0, 1e-5,
                      segment_ids=random_segments(rng, 3, 29))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents_equal_separate_runs(impl, reverse):
  rng = np.random.default_rng(4)
  lengths = [11, 4, 17]
  a, b, h0 = random_inputs(rng, (2, sum(lengths), 3), "float32")
  segment_ids = np.repeat(np.array([5, 1, 5], np.int32), lengths)[None].repeat(2, 0)
  fn = jax.jit(scan.IMPLEMENTATIONS[impl], static_argnames="reverse")
  h, final = fn(a, b, initial_state=h0, segment_ids=segment_ids, reverse=reverse)
  bounds = np.cumsum([0, *lengths])
  first_doc = len(lengths) - 1 if reverse else 0  # initial_state feeds the first in scan order
  for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    init = h0 if k == first_doc else None
    h_doc, final_doc = fn(a[:, lo:hi], b[:, lo:hi], initial_state=init, reverse=reverse)
    assert rel_err(h[:, lo:hi], h_doc) < 1e-6
    if k == len(lengths) - 1 - first_doc:  # the last document in scan order
      assert rel_err(final, final_doc) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_small_decays_do_not_underflow_into_nan(impl):
  # Products of 300 decays in (0.01, 0.1) underflow float32 to 0: dividing by cumulative
  # products would give inf/NaN here.
  rng = np.random.default_rng(5)
  a = rng.uniform(0.01, 0.1, (2, 300, 3)).astype("float32")
  b = rng.normal(size=(2, 300, 3)).astype("float32")
  h0 = rng.normal(size=(2, 3)).astype("float32")
  kwargs = {"chunk_size": 64} if impl == "chunked" else {}
  check_against_numpy(scan.IMPLEMENTATIONS[impl], a, b, h0, 1e-5, **kwargs)


@pytest.mark.parametrize("length", [0, 1])
@pytest.mark.parametrize("impl", IMPLS)
def test_degenerate_lengths(impl, length):
  rng = np.random.default_rng(6)
  a, b, h0 = random_inputs(rng, (2, length, 3), "float32")
  h, final = scan.IMPLEMENTATIONS[impl](a, b, initial_state=h0)
  h_ref, final_ref, _ = np_scan(a, b, h0)
  assert h.shape == (2, length, 3)
  np.testing.assert_allclose(h, h_ref, rtol=1e-6)
  assert rel_err(final, final_ref) < 1e-6


def test_low_precision_inputs_give_float32_state():
  rng = np.random.default_rng(7)
  a, b, h0 = random_inputs(rng, (2, 40, 3), "float32")
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  h, final = scan.linear_scan(a16, b16)
  assert h.dtype == jnp.float32 and final.dtype == jnp.float32
  # The reference sees the same bf16-rounded inputs, so only the state's rounding differs.
  h_ref, _, _ = np_scan(np.asarray(a16, np.float32), np.asarray(b16, np.float32), 0 * h0)
  assert rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_linear_scan_dispatch(impl):
  rng = np.random.default_rng(8)
  a, b, h0 = random_inputs(rng, (2, 45, 3), "complex64")
  check_against_numpy(lambda *args, **kw: scan.linear_scan(*args, impl=impl, chunk_size=4, **kw),
                      a, b, h0, 1e-5, segment_ids=random_segments(rng, 2, 45), reverse=True)


def test_default_chunk_size_is_near_sqrt_length():
  for length in [1, 2, 100, 1024, 5000, 16384]:
    c = scan.default_chunk_size(length)
    assert c >= 1 and c & (c - 1) == 0
    assert np.sqrt(length) / 2 <= c <= 2 * np.sqrt(length) or length == 1


# ---------------------------------------------------------------------------------------------
# Errors name what is wrong.

def test_unknown_impl_names_the_choices():
  a = b = np.ones((1, 4, 2), np.float32) * 0.5
  with pytest.raises(ValueError, match="impl") as info:
    scan.linear_scan(a, b, impl="fast")
  for name in ["reference", "chunked", "associative", "auto", "'fast'"]:
    assert name in str(info.value)


@pytest.mark.parametrize("kwargs, names", [
    ({"a": (2, 5, 3), "b": (2, 6, 3)}, ["a", "b", "(2, 5, 3)", "(2, 6, 3)"]),
    ({"a": (5, 3), "b": (2, 5, 3)}, ["a", "b"]),
    ({"a": (2, 5, 3), "b": (5,)}, ["b", "batch, length"]),
    ({"initial_state": (2, 4)}, ["initial_state", "(2, 4)", "(2, 3)"]),
    ({"segment_ids": (2, 4)}, ["segment_ids", "(2, 4)", "(2, 5)"]),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_shape_errors_name_the_argument(impl, kwargs, names):
  rng = np.random.default_rng(9)
  shapes = {"a": (2, 5, 3), "b": (2, 5, 3), **kwargs}
  args = {k: rng.uniform(0.5, 1.0, s).astype("float32") for k, s in shapes.items()}
  if "segment_ids" in args:
    args["segment_ids"] = args["segment_ids"].astype(np.int32)
  with pytest.raises(ValueError) as info:
    scan.linear_scan(args.pop("a"), args.pop("b"), impl=impl, **args)
  for name in names:
    assert name in str(info.value)


def test_float_segment_ids_rejected():
  a = b = np.full((1, 4, 2), 0.5, np.float32)
  with pytest.raises(ValueError, match="segment_ids must be integer"):
    scan.linear_scan(a, b, segment_ids=np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("chunk_size", [0, -2, 2.0, True])
def test_bad_chunk_size(chunk_size):
  a = b = np.full((1, 4, 2), 0.5, np.float32)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    scan.linear_scan(a, b, impl="chunked", chunk_size=chunk_size)
