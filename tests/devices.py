"""Running a check on several CPU devices: XLA's device count is fixed when jax starts, so
multi-device checks run in a subprocess with `--xla_force_host_platform_device_count`.

Such a subprocess spends most of its time compiling (every mesh is a new program), most of that
in LLVM turning XLA's fused kernels into machine code. So it compiles at LLVM -O0
(`FAST_COMPILE_FLAGS`): about half the compile time. It changes nothing these checks are about:
XLA's HLO passes (SPMD partitioning, the collectives, fusion, layout, buffer assignment) are the
same at every backend optimization level, only the machine code of each kernel is less optimised;
floats stay IEEE (no fast math either way), so results move by rounding only, both sides of every
comparison are compiled with the same flags, and the tolerances (1e-5 between meshes / shardings
of the same float32 computation) are far above that rounding. (Not suite-wide: the in-process
float64 finite-difference checks are tuned to the default code's rounding; one of them, in
test_s4d.py, misses its 1e-6 tolerance by 2x at -O0.)

Each subprocess pays for starting jax and compiling every program it runs: put related checks in
one subprocess, and take an output and its gradient from one compiled program (jax.grad with
has_aux) rather than compiling the forward pass twice.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_devices_env(devices: int) -> dict[str, str]:
  """The environment of a subprocess whose jax sees `devices` CPU devices (and compiles with
  FAST_COMPILE_FLAGS)."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}")


def run_on_cpu_devices(argv: Sequence[str], devices: int, *, timeout: int = 1200) -> Any:
  """Runs `python <argv>` from the repository root with `devices` CPU devices and returns the JSON
  value printed on its last line (the test fails with the subprocess's stderr otherwise)."""
  proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                        env=cpu_devices_env(devices), cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
