"""How the kernel tests run a Pallas kernel on the machine they find.

CPU (CI): every kernel runs in the TPU interpreter, both the GPU driver (`platform=None`, which
is "cpu" there: the kernels run it as the GPU driver, with the GPU's matmul numerics and block
limits) and the TPU driver (`platform="tpu"`). Out-of-bounds block reads raise and memory starts
as NaN, so a wrong index map or an output left unwritten fails instead of passing by clamping.

GPU or TPU: the machine's own driver (`platform=None`) compiles for real: the check that only
such a machine can make (`scripts/gpu_checks.sh`). A case for the other machine's driver is
skipped: only that hardware compiles it, and the CPU run already interprets it.
"""

from __future__ import annotations

import jax
import pytest
from jax.experimental.pallas import tpu as pltpu

from layers.pallas import dispatch

BACKEND = jax.default_backend()
ON_ACCELERATOR = BACKEND in dispatch.KERNEL_PLATFORMS
# What impl="auto" resolves to for a call the kernel supports.
AUTO_IMPL = "pallas" if ON_ACCELERATOR else "xla"
_CHECKED_INTERPRETER = pltpu.InterpretParams(out_of_bounds_reads="raise",
                                             uninitialized_memory="nan")


def interpret(platform: str | None = None):
  """The `interpret=` argument for a kernel call with `platform=` (None: this machine's driver).

  Skips the calling test where that driver can neither compile nor be interpreted here.
  """
  if not ON_ACCELERATOR:
    return _CHECKED_INTERPRETER
  if platform not in (None, BACKEND):
    pytest.skip(f"the {platform} driver compiles only on a {platform}; CPU runs interpret it")
  return False
