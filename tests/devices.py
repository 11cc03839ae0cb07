"""Running a check on several CPU devices: XLA's device count is fixed when jax starts, so
multi-device checks run in a subprocess with `--xla_force_host_platform_device_count`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_cpu_devices(argv: Sequence[str], devices: int, *, timeout: int = 1200) -> Any:
  """Runs `python <argv>` from the repository root with `devices` CPU devices and returns the JSON
  value printed on its last line (the test fails with the subprocess's stderr otherwise)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
