"""Compiles, on a machine without a GPU, every Pallas kernel that `scripts/gpu_checks.sh`'s
benchmarks run, as the lent GPU (H100/H200, sm_90) would, and reports per kernel the shared
memory Triton asks for and the registers and spills ptxas gives it.

A kernel whose shared memory passes 227 KiB (the most an sm_90 block can have) would fail to
launch there, and heavy spills make it slow. This finds both without a GPU: JAX's CUDA plugin
compiles Triton kernels to PTX on the CPU, and ptxas assembles the PTX.

Setup (a separate virtual environment with the project's dependencies, plus about 220 MB):
  python3 -m venv /tmp/sm90 && /tmp/sm90/bin/pip install -e . \
      "jax-cuda12-plugin==$(python3 -c 'import jax; print(jax.__version__)')" \
      "jax-cuda12-pjrt==<the same>" nvidia-cuda-nvcc-cu12 --no-deps   # then the deps of -e .
Run from the repository root:
  JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /tmp/sm90/bin/python \
      scripts/sm90_compile_report.py [--ptxas PATH]
It exits 1 if a kernel needs more shared memory than sm_90 has, or ptxas rejects one.

It relies on JAX internals (the Triton lowering's compile path, taken for jaxlib > 0.10.2, is
forced here), so it is a development tool, not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile

SM90_MAX_SHARED_BYTES = 227 * 1024


def bench_commands() -> list[list[str]]:
  """The `ssm bench` argument lists of gpu_checks.sh, from its dry run, less --json, --repeats
  and --warmup (nothing is timed here)."""
  env = dict(os.environ, GPU_CHECKS_DRY_RUN="1")
  with tempfile.TemporaryDirectory() as out:
    lines = subprocess.run(["scripts/gpu_checks.sh", out], env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()
  commands = []
  for line in lines:
    words = shlex.split(line.removeprefix("DRY: "))
    if words[1:4] == ["-m", "ssm", "bench"]:
      args = words[4:]
      for flag in ("--json", "--repeats", "--warmup"):
        if flag in args:
          i = args.index(flag)
          del args[i:i + 2]
      commands.append(args)
  return commands


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ptxas", help="ptxas to assemble each kernel with (default: the one of "
                      "the nvidia-cuda-nvcc-cu12 wheel, if installed)")
  cli = parser.parse_args()
  ptxas = cli.ptxas
  if ptxas is None:
    try:
      import nvidia.cuda_nvcc
      ptxas = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
    except ImportError:
      pass

  import jax
  jax.devices()  # registers the CUDA plugin's Triton compiler (the CUDA backend itself fails)
  from jax._src.lib import triton
  if not triton.has_compilation_handler("CUDA"):
    sys.exit("no Triton compiler for CUDA: install jax-cuda12-plugin and jax-cuda12-pjrt of "
             "this jax's version, and set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1")
  from jax._src.pallas.triton import pallas_call_registration as registration
  registration.jaxlib_version = (0, 10, 3)  # compile to PTX while lowering, as newer jaxlibs do
  kernel_lib = registration.triton_kernel_call_lib
  kernels: list[dict] = []
  context: list[str] = [""]

  class RecordingKernelLib:
    def __getattr__(self, name):
      return getattr(kernel_lib, name)

    def TritonKernel(self, name, num_warps, num_ctas, smem, ptx, ttir, capability):
      kernels.append(dict(name=name, warps=num_warps, smem=smem, ptx=ptx, command=context[0]))
      return kernel_lib.TritonKernel(name, num_warps, num_ctas, smem, ptx, ttir, capability)

  registration.triton_kernel_call_lib = RecordingKernelLib()

  from layers.pallas import dispatch
  from ssm import bench
  dispatch.platform = lambda: "gpu"
  dispatch.interpret_mode = lambda: False
  bench.kernel_impls = lambda names: list(names)

  def lower_for_cuda(fn, *args, **_):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return [1.0], 1.0

  bench.time_fn = lower_for_cuda
  bench.load_cases()
  for args in bench_commands():
    context[0] = " ".join(args)
    print(f"lowering: {context[0]}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # its table holds no timings here
      bench.main(args + ["--bandwidth-gbs", "1000", "--repeats", "1"])

  failed = False
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for k in kernels:
      ptxas_info = "-"
      if ptxas:
        path = os.path.join(tmp, k["name"] + ".ptx")
        with open(path, "w") as f:
          f.write(k["ptx"])
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True)
        failed |= run.returncode != 0
        registers = re.search(r"Used (\d+) registers", run.stderr)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
        ptxas_info = (f"{registers[1]:>9s} {spills[1]:>12s} {spills[2]:>11s}"
                      if run.returncode == 0 and registers and spills
                      else "ptxas failed: " + run.stderr[-300:])
      over = k["smem"] > SM90_MAX_SHARED_BYTES
      failed |= over
      shared = f"{k['smem'] / 1024:.0f}{' OVER' if over else ''}"
      row = (k["name"], k["warps"], shared, ptxas_info)
      rows.setdefault(row, k["command"])  # identical kernels: the first benchmark that ran it
  print(f"\n{'kernel':26s} {'warps':>5s} {'shared KiB':>10s} {'registers':>9s} "
        f"{'spill stores':>12s} {'spill loads':>11s}  benchmark")
  for (name, warps, shared, ptxas_info), command in rows.items():
    print(f"{name:26s} {warps:5d} {shared:>10s} {ptxas_info}  {command}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
