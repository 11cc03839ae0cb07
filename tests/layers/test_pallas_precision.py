"""The float32 matmul of the Pallas kernels (`layers.pallas.precision`) against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.pallas import precision

DIMS = (((1,), (0,)), ((), ()))


def tf32_by_frexp(x: np.ndarray) -> np.ndarray:
  """x rounded to 11 significant bits, computed in float64 (ties cannot occur for these x)."""
  mantissa, exponent = np.frexp(x.astype(np.float64))
  return np.ldexp(np.round(mantissa * 2.0**11) / 2.0**11, exponent)


def test_tf32_rounding_matches_a_float64_computation():
  scales = 10.0 ** np.arange(-4, 6).repeat(1000)
  x = (np.random.default_rng(0).normal(size=10_000) * scales).astype(np.float32)
  rounded = np.asarray(precision._to_tf32(jnp.asarray(x)))
  np.testing.assert_array_equal(rounded.astype(np.float64), tf32_by_frexp(x))
  assert np.all(np.abs(rounded - x) <= 2.0**-11 * np.abs(x))
  assert np.mean(rounded != x) > 0.99  # it does round


def rel64(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("platform", ["gpu", "tpu", "cpu"])
def test_float32_accuracy_on_every_platform(platform):
  """The GPU driver interpreted ("gpu", and "cpu" as the CPU tests run it: three TF32 passes) and
  the TPU one (HIGHEST): ~1e-7 of float64 on [64, 128] @ [128, 64]; a single TF32 pass would be
  ~1e-4 off."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(64, 128)), rng.normal(size=(128, 64))
  exact = a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  out = jax.jit(lambda x, y: precision.dot_general(x, y, DIMS, platform=platform,
                                                   interpret=True))(a32, b32)
  assert out.dtype == jnp.float32
  assert rel64(out, exact) < 1e-6
  highest = jnp.matmul(a32, b32, precision=jax.lax.Precision.HIGHEST)
  assert np.array_equal(out, highest) == (platform == "tpu")  # the passes are what ran
  one_pass = np.asarray(precision._to_tf32(a32), np.float64) @ np.asarray(
      precision._to_tf32(b32), np.float64)
  assert rel64(one_pass, exact) > 1e-4



@pytest.mark.parametrize("platform", ["gpu", "tpu", "cpu"])
def test_bf16_operands_are_one_pass_on_the_rounded_operands(platform):
  """bf16_operands: the product of a and b rounded to bf16 (exact in float32, accumulated in
  float32), ~1e-3 from the float32 product; float32 results."""
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(32, 64)), rng.normal(size=(64, 16))
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  out = precision.dot_general(a32, b32, DIMS, platform=platform, interpret=True,
                              bf16_operands=True)
  assert out.dtype == jnp.float32
  rounded = (np.asarray(a32.astype(jnp.bfloat16), np.float64)
             @ np.asarray(b32.astype(jnp.bfloat16), np.float64))
  assert rel64(out, rounded) < 1e-6
  assert rel64(out, np.asarray(a32, np.float64) @ np.asarray(b32, np.float64)) > 1e-4
