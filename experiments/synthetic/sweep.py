"""A sweep over mixer x d_model x learning rate on MQAR, with one results table at the end.

  python experiments/synthetic/sweep.py [--setting 64x4] [--mixers attention,mamba,...]
      [--d-models 64,128,256] [--lrs 3e-4,1e-3,3e-3] [--out runs/mqar_sweep] [--dry-run]
      [--config.train.num_steps=2000 ...]

Each combination trains `experiments/synthetic/mqar.py:<mixer>,<setting>,d<d>,lr<lr>` through
`python -m ssm train` (its own process, so one failure does not end the sweep) into
OUT/<run name>; runs that already finished (result.json present) are skipped, so an interrupted
sweep resumes. Then `python -m ssm report` writes OUT/report/report.md (+ .csv and plots) over
all runs. Extra `--config.*` overrides go to every run.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "synthetic" / "mqar.py"
MIXERS = ("attention", "swa", "mamba", "mamba2", "gated_deltanet", "hyena", "s4d")


def runs(setting: str, mixers, d_models, lrs):
  """(run name, config argument) per combination."""
  for mixer, d, lr in itertools.product(mixers, d_models, lrs):
    yield f"mqar_{setting}_{mixer}_d{d}_lr{lr:g}", f"{CONFIG}:{mixer},{setting},d{d},lr{lr:g}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--setting", default="64x4", help="(length)x(pairs), e.g. 256x16")
  parser.add_argument("--mixers", default=",".join(MIXERS))
  parser.add_argument("--d-models", default="64,128,256")
  parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
  parser.add_argument("--out", default="runs/mqar_sweep")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad} (overrides look like --config.train.num_steps=100)")
  out = pathlib.Path(args.out).resolve()
  combos = list(runs(args.setting, args.mixers.split(","),
                     [int(d) for d in args.d_models.split(",")],
                     [float(lr) for lr in args.lrs.split(",")]))
  failed = []
  for name, config in combos:
    workdir = out / name
    command = [sys.executable, "-m", "ssm", "train", "--config", config, "--workdir", str(workdir),
               "--config.train.progress_bar=False", *overrides]
    if args.dry_run:
      print(" ".join(command))
      continue
    if (workdir / "result.json").exists():
      print(f"{name}: finished earlier, skipped")
      continue
    print(f"{name}: training", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
      failed.append(name)
  if args.dry_run:
    return 0
  report = [sys.executable, "-m", "ssm", "report", "--skip-bad", "--out", str(out / "report"),
            *(str(out / name) for name, _ in combos)]
  code = subprocess.run(report, cwd=ROOT).returncode
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else code


if __name__ == "__main__":
  sys.exit(main())
