"""Kernel benchmarks: `python -m ssm bench [--ops scan ...]`.

Each op registers a benchmark case (`register`) that times the op's implementations against each
other on the current device and returns one row per (implementation, shape, mode). Every row
carries the median time, the speedup over the op's reference implementation measured in the same
run (reference_ms / ms, so the reference itself is exactly 1), and a roofline estimate: the
compulsory bytes (inputs read once, outputs written once) over the memory bandwidth.

The cases live one file per op family in the package `ssm.benchmarks`, which `load_cases` imports.
Timing claims live here, in the printed table and the JSON file, never in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import pkgutil
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Row = dict[str, Any]

# Nominal peak memory bandwidth (GB/s) by device kind, matched as a case-insensitive substring of
# `device.device_kind`, first match wins; then a per-platform fallback. Override with
# --bandwidth-gbs: the CPU figure in particular is a rough dual-channel DDR guess.
_BANDWIDTH_BY_KIND: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0),
    ("L4", 300.0), ("A10", 600.0), ("V100", 900.0),
    ("v5 lite", 819.0), ("v5e", 819.0), ("v5p", 2765.0), ("v5", 2765.0), ("v6", 1640.0),
    ("v4", 1200.0),
)
_BANDWIDTH_BY_PLATFORM = {"cpu": 50.0, "gpu": 1000.0, "tpu": 1000.0}


@dataclasses.dataclass(frozen=True)
class BenchCase:
  """One op's benchmark.

  run(args) -> rows, where args holds the parsed common flags (`lengths`, `batch`, `features`,
  `dtype`, `repeats`, `warmup`, `grad`, `bandwidth_gbs`) and the case's own flags.
  add_arguments(parser) adds the case's own flags; name them `--<op>-...` to avoid clashes.
  """
  name: str
  description: str
  run: Callable[[argparse.Namespace], list[Row]]
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


CASES: dict[str, BenchCase] = {}


def register(name: str, description: str,
             add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
             ) -> Callable[[Callable[[argparse.Namespace], list[Row]]],
                           Callable[[argparse.Namespace], list[Row]]]:
  """Decorator registering `run(args) -> rows` as the benchmark of op `name`."""
  def decorate(run: Callable[[argparse.Namespace], list[Row]]
               ) -> Callable[[argparse.Namespace], list[Row]]:
    if name in CASES:
      raise ValueError(f"benchmark op {name!r} is registered twice")
    CASES[name] = BenchCase(name, description, run, add_arguments)
    return run
  return decorate


def device_info() -> dict[str, Any]:
  """Platform and device of the default backend."""
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count()}


def default_bandwidth_gbs(platform: str, device_kind: str) -> float:
  """Nominal memory bandwidth of the device, in GB/s (see `_BANDWIDTH_BY_KIND`)."""
  if platform != "cpu":
    for key, gbs in _BANDWIDTH_BY_KIND:
      if key.lower() in device_kind.lower():
        return gbs
  return _BANDWIDTH_BY_PLATFORM.get(platform, 100.0)


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int, warmup: int = 1
            ) -> tuple[list[float], float]:
  """Times `jax.jit(fn)(*args)`; returns (per-call milliseconds, first-call milliseconds).

  The first call (compile + run) and `warmup - 1` more calls are not in the timings; every call
  is waited for with `block_until_ready`.
  """
  jitted = jax.jit(fn)
  start = time.perf_counter()
  jax.block_until_ready(jitted(*args))
  first_ms = (time.perf_counter() - start) * 1e3
  for _ in range(warmup - 1):
    jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return times, first_ms


def compare(op: str, impls: dict[str, Callable[..., Any]], args: Sequence[Any], *,
            settings: argparse.Namespace, bytes_moved: int, reference: str = "reference",
            **fields: Any) -> list[Row]:
  """Times every implementation on the same arguments; one row each.

  `impls` maps a row name to a function of `args`; `reference` names the one the speedups are
  relative to (None speedups if it is absent). `fields` (shape, mode, ...) go into every row.
  """
  rows = []
  for name, fn in impls.items():
    times, first_ms = time_fn(fn, *args, repeats=settings.repeats, warmup=settings.warmup)
    ms = statistics.median(times)
    roofline_ms = bytes_moved / (settings.bandwidth_gbs * 1e9) * 1e3
    rows.append({"op": op, "impl": name, **fields, "ms": ms, "min_ms": min(times),
                 "first_call_ms": first_ms, "bytes": bytes_moved, "roofline_ms": roofline_ms,
                 "roofline_frac": roofline_ms / ms})
  ref_ms = next((r["ms"] for r in rows if r["impl"] == reference), None)
  for r in rows:
    # The reference row divides its own time by itself: exactly 1.0.
    r["speedup"] = None if ref_ms is None else ref_ms / r["ms"]
  return rows


# ---------------------------------------------------------------------------------------------
# Command line.

def fwd_or_grad(fn: Callable[..., Any], args: argparse.Namespace) -> Callable[..., Any]:
  """fn(*inputs) -> y; forward only, or y's VJP (cotangent of ones) for every input under --grad."""
  if not args.grad:
    return fn
  def fwd_bwd(*inputs):
    y, pullback = jax.vjp(fn, *inputs)
    return pullback(jnp.ones_like(y))
  return fwd_bwd


def load_cases() -> None:
  """Imports every module of the package `ssm.benchmarks`; each registers its ops on import."""
  from ssm import benchmarks
  for module in pkgutil.iter_modules(benchmarks.__path__):
    importlib.import_module(f"{benchmarks.__name__}.{module.name}")


# ---------------------------------------------------------------------------------------------
# Command line.

def int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected integers separated by commas; got {text!r}")
  if any(v <= 0 for v in values):
    raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
  return values


def _str_list(text: str) -> list[str]:
  return [v for v in text.split(",") if v]


def _flatten(lists: Sequence[Sequence[Any]]) -> list[Any]:
  return [v for sub in lists for v in sub]


def build_parser() -> argparse.ArgumentParser:
  load_cases()
  parser = argparse.ArgumentParser(
      prog="python -m ssm bench",
      description="Time each op's implementations against each other and the roofline.")
  ops = ", ".join(f"{c.name} ({c.description})" for c in CASES.values())
  parser.add_argument("--ops", type=_str_list, nargs="+", default=[["scan"]],
                      help=f"ops to benchmark (default: scan). Known: {ops}")
  parser.add_argument("--lengths", type=int_list, nargs="+", default=[[1024, 4096, 16384]],
                      help="sequence lengths, comma or space separated (default 1024,4096,16384)")
  parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
  parser.add_argument("--features", type=int, default=256,
                      help="feature/channel count (default 256)")
  parser.add_argument("--dtype", default="float32", help="input dtype (default float32)")
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed calls per row; the median is reported (default 10)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed calls first, the compiling one included (default 2)")
  parser.add_argument("--grad", action="store_true",
                      help="time forward+backward (a VJP) instead of the forward pass")
  parser.add_argument("--bandwidth-gbs", type=float, default=None,
                      help="memory bandwidth for the roofline, GB/s (default: by device)")
  parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
  for case in CASES.values():
    if case.add_arguments is not None:
      case.add_arguments(parser.add_argument_group(f"op {case.name}"))
  return parser


_COLUMNS = (("op", "op", "{}"), ("impl", "impl", "{}"), ("mode", "mode", "{}"),
            ("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("ms", "median ms", "{:.4g}"),
            ("speedup", "vs reference", "{:.2f}x"), ("roofline_ms", "roofline ms", "{:.4g}"),
            ("roofline_frac", "of roofline", "{:.1%}"))


def format_table(rows: Sequence[Row]) -> str:
  """Rows as an aligned text table (text left-aligned, numbers right-aligned)."""
  cells = [[title for _, title, _ in _COLUMNS]]
  for r in rows:
    cells.append(["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in _COLUMNS])
  widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
  numeric = [fmt != "{}" for _, _, fmt in _COLUMNS]
  lines = []
  for n, row in enumerate(cells):
    lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                           for c, w, num in zip(row, widths, numeric)).rstrip())
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmarks named by --ops, prints the table, writes JSON if asked. Returns 0."""
  parser = build_parser()
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  for key, value in vars(args).items():
    # List flags take several comma-separated words: flatten [[1, 2], [3]] to [1, 2, 3].
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
      setattr(args, key, _flatten(value))
  ops = args.ops
  unknown = [op for op in ops if op not in CASES]
  if unknown:
    parser.error(f"--ops: unknown op(s) {unknown}; known: {sorted(CASES)}")
  for flag in ("batch", "features", "repeats", "warmup"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
  try:
    jnp.dtype(args.dtype)
  except TypeError:
    parser.error(f"--dtype: unknown dtype {args.dtype!r}")
  info = device_info()
  bandwidth_default = args.bandwidth_gbs is None
  if bandwidth_default:
    args.bandwidth_gbs = default_bandwidth_gbs(info["platform"], info["device_kind"])
  print(f"platform {info['platform']}, device {info['device_kind']} x{info['num_devices']}, "
        f"jax {jax.__version__}, bandwidth {args.bandwidth_gbs:g} GB/s"
        f"{' (default for this device; set --bandwidth-gbs)' if bandwidth_default else ''}")
  rows: list[Row] = []
  for op in ops:
    rows += CASES[op].run(args)
  print(format_table(rows))
  if args.json:
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    report = {"device": info, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "jax_version": jax.__version__, "numpy_version": np.__version__,
              "settings": settings, "rows": rows}
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
