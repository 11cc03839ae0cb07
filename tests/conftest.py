"""Suite-wide numerics settings, applied before JAX starts a backend.

- float32 matmuls at full precision: on GPUs JAX's default lets XLA use TF32 (about 1e-3 relative
  error), which would hide real bugs below the suite's 1e-5 tolerance against float64 references.
- deterministic GPU reductions, so a resumed run can be compared bit for bit with an uninterrupted one.
On CPU both are already the case.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")
