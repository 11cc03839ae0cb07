"""scripts/gpu_checks.sh runs only what exists. In its dry run (GPU_CHECKS_DRY_RUN=1) every
`python -m ssm bench` it would run parses with the benchmark's own parser and names known ops,
forward and forward+backward for each of the four kernel ops, as docs/benchmarks.md lists them;
and every test file it would run exists. A renamed flag or file fails here, not on a lent GPU."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from ssm import bench
from tests.devices import ROOT

SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
KERNEL_OPS = {"gated_delta", "ssd", "selective_scan", "window_attention"}


def dry_run_commands(out_dir) -> list[list[str]]:
  proc = subprocess.run(["bash", str(SCRIPT), str(out_dir)], capture_output=True, text=True,
                        env=dict(os.environ, GPU_CHECKS_DRY_RUN="1", PYTHON=sys.executable),
                        timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return [shlex.split(line[len("DRY: "):]) for line in proc.stdout.splitlines()
          if line.startswith("DRY: ")]


def test_every_command_of_the_gpu_script_exists(tmp_path):
  commands = dry_run_commands(tmp_path)
  assert all(c[0] == sys.executable for c in commands)
  tests = [c[3:] for c in commands if c[1:3] == ["-m", "pytest"]]
  runs = [c[4:] for c in commands if c[1:4] == ["-m", "ssm", "bench"]]
  assert len(tests) == 1 and len(runs) + 1 == len(commands)

  files = [a for a in tests[0] if a.startswith("tests/")]
  assert len(files) == 4 and all((ROOT / f).is_file() for f in files), files

  documented = (ROOT / "docs" / "benchmarks.md").read_text()
  covered = set()
  for argv in runs:
    args = bench.build_parser().parse_args(argv)
    ops = {op for group in args.ops for op in group}
    assert ops <= set(bench.CASES), ops
    covered |= {(op, args.grad) for op in ops}
    # The sizes are the ones docs/benchmarks.md records, less the run settings.
    common = {"--repeats": 2, "--warmup": 2, "--json": 2, "--grad": 1}
    sizes, i = [], 0
    while i < len(argv):
      skip = common.get(argv[i], 0)
      sizes += [] if skip else [argv[i]]
      i += skip or 1
    assert f"python -m ssm bench {' '.join(sizes)} [--grad]" in documented, sizes
  assert covered == {(op, grad) for op in KERNEL_OPS for grad in (False, True)}
