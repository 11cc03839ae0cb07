"""Kernel benchmarks: `python -m ssm bench [--ops scan ...]`.

Each op registers a benchmark case (`register`) that times the op's implementations against each
other on the current device and returns one row per (implementation, shape, mode). Every row
carries the median time, the speedup over the op's reference implementation measured in the same
run (reference_ms / ms, so the reference itself is exactly 1), and two rooflines: the compulsory
bytes (inputs read once, outputs written once) over the memory bandwidth (on GPU/TPU measured at
start-up by a large copy, on CPU a nominal figure; `--bandwidth-gbs` overrides), and, where a case
counts its FLOPs, those over the device's peak matmul throughput for the dtype. An implementation
whose compiled program would need more memory than the device has (XLA's own estimate, before
anything runs; `--max-memory-gb`) is left out with a note on stderr instead of failing the run:
the token-by-token references' backward passes save a state per token.

The cases live one file per op family in the package `ssm.benchmarks`, which `load_cases` imports.
Timing claims live here, in the printed table and the JSON file, never in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
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

# Nominal dense matmul peak (TFLOP/s) by device kind: (bfloat16, float32). float32 is the TF32
# tensor-core rate on NVIDIA (JAX's default matmul precision there); TPUs run float32 matmuls as
# bf16 passes, so their float32 entry is the bf16 peak / 3 (the default 3-pass precision).
_PEAK_TFLOPS_BY_KIND: tuple[tuple[str, tuple[float, float]], ...] = (
    ("H200", (989.0, 495.0)), ("H100 PCIe", (756.0, 378.0)), ("H100", (989.0, 495.0)),
    ("A100", (312.0, 156.0)), ("L4", (121.0, 60.0)), ("v5 lite", (197.0, 66.0)),
    ("v5e", (197.0, 66.0)), ("v5p", (459.0, 153.0)), ("v6", (918.0, 306.0)),
    ("v4", (275.0, 92.0)),
)


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


def peak_tflops(platform: str, device_kind: str, dtype: Any) -> float | None:
  """Nominal peak matmul TFLOP/s for `dtype` inputs (see `_PEAK_TFLOPS_BY_KIND`); None if the
  device is not in the table (CPU included)."""
  if platform == "cpu":
    return None
  for key, (bf16, f32) in _PEAK_TFLOPS_BY_KIND:
    if key.lower() in device_kind.lower():
      return bf16 if jnp.dtype(dtype).itemsize <= 2 else f32
  return None


def measure_bandwidth_gbs(mbytes: int = 512) -> float:
  """Memory bandwidth of the default device in GB/s, measured by y = x + 1 on a float32 array of
  `mbytes` MB (read once, written once; the best of 5 timed calls)."""
  x = jnp.zeros((mbytes * 2**20 // 4,), jnp.float32)
  times, _ = time_fn(lambda x: x + 1, x, repeats=5, warmup=2)
  return 2 * x.nbytes / (min(times) * 1e-3) / 1e9


class OverMemoryBudget(Exception):
  """A compiled program needs more memory than `--max-memory-gb` allows."""


def memory_needed(compiled: Any) -> int | None:
  """Bytes a compiled program holds at its peak by XLA's buffer assignment (arguments, outputs
  and temporaries), or None where the backend does not say."""
  m = compiled.memory_analysis()  # None where unavailable
  if m is None:
    return None
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def default_memory_budget_bytes() -> int:
  """90% of the default device's memory (its allocator's limit), or of the machine's RAM on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(0.9 * total)


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int, warmup: int = 1,
            max_bytes: int | None = None) -> tuple[list[float], float]:
  """Times `jax.jit(fn)(*args)`; returns (per-call milliseconds, first-call milliseconds).

  The first call (trace, compile and run) and `warmup - 1` more calls are not in the timings;
  every call is waited for with `block_until_ready`. Raises OverMemoryBudget, before running
  anything, where the compiled program needs more than `max_bytes` (`memory_needed`).
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  needed = memory_needed(compiled)
  if max_bytes is not None and needed is not None and needed > max_bytes:
    raise OverMemoryBudget(f"needs {needed / 1e9:.3g} GB, over the {max_bytes / 1e9:.3g} GB "
                           "budget (--max-memory-gb)")
  jax.block_until_ready(compiled(*args))
  first_ms = (time.perf_counter() - start) * 1e3
  for _ in range(warmup - 1):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return times, first_ms


def compare(op: str, impls: dict[str, Callable[..., Any]], args: Sequence[Any], *,
            settings: argparse.Namespace, bytes_moved: int, reference: str = "reference",
            flops: float | None = None, **fields: Any) -> list[Row]:
  """Times every implementation on the same arguments; one row each.

  `impls` maps a row name to a function of `args`; `reference` names the one the speedups are
  relative to (None speedups if it is absent). `flops`: the op's useful FLOPs (for the FLOP
  roofline, against `settings.peak_tflops` when known). `fields` (shape, mode, ...) go into
  every row. An implementation over the memory budget (`settings.max_memory_bytes`) gets no row,
  and a line on stderr saying so.
  """
  rows = []
  for name, fn in impls.items():
    try:
      times, first_ms = time_fn(fn, *args, repeats=settings.repeats, warmup=settings.warmup,
                                max_bytes=settings.max_memory_bytes)
    except OverMemoryBudget as e:
      print(f"{op} {name} {fields.get('shape', '')} ({fields.get('mode', '')}): skipped, {e}",
            file=sys.stderr)
      continue
    rows.append(timed_row(op, name, times, first_ms, settings=settings, bytes_moved=bytes_moved,
                          flops=flops, **fields))
  ref_ms = next((r["ms"] for r in rows if r["impl"] == reference), None)
  for r in rows:
    # The reference row divides its own time by itself: exactly 1.0.
    r["speedup"] = None if ref_ms is None else ref_ms / r["ms"]
  return rows


def timed_row(op: str, impl: str, times: Sequence[float], first_ms: float, *,
              settings: argparse.Namespace, bytes_moved: int, flops: float | None = None,
              **fields: Any) -> Row:
  """One row from per-call times in ms (for timings taken outside `compare`, e.g. torch)."""
  ms = statistics.median(times)
  roofline_ms = bytes_moved / (settings.bandwidth_gbs * 1e9) * 1e3
  peak = getattr(settings, "peak_tflops", None)
  return {"op": op, "impl": impl, **fields, "ms": ms, "min_ms": min(times),
          "first_call_ms": first_ms, "bytes": bytes_moved, "roofline_ms": roofline_ms,
          "roofline_frac": roofline_ms / ms, "flops": flops,
          "tflops": None if flops is None else flops / (ms * 1e-3) / 1e12,
          "flop_frac": None if flops is None or peak is None else flops / (peak * 1e12 * ms * 1e-3)}


def kernel_impls(names: Sequence[str]) -> list[str]:
  """The implementations worth timing here: "pallas" only on GPU/TPU (on CPU it would run in
  interpret mode, a correctness tool, not a speed)."""
  on_accelerator = jax.default_backend() in ("gpu", "tpu")
  return [n for n in names if n != "pallas" or on_accelerator]


def add_ratio_to(rows: list[Row], baseline: Row, key: str) -> None:
  """rows[i][key] = baseline ms / rows[i] ms (e.g. the speed relative to another library)."""
  for r in rows:
    r[key] = baseline["ms"] / r["ms"]


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
                      help="memory bandwidth for the roofline, GB/s (default: measured on "
                           "GPU/TPU, nominal on CPU)")
  parser.add_argument("--max-memory-gb", type=float, default=None,
                      help="leave out an implementation whose compiled program needs more "
                           "memory than this, by XLA's estimate (default: 90%% of the device's "
                           "memory; of the machine's RAM on CPU)")
  parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
  for case in CASES.values():
    if case.add_arguments is not None:
      case.add_arguments(parser.add_argument_group(f"op {case.name}"))
  return parser


_COLUMNS = (("op", "op", "{}"), ("impl", "impl", "{}"), ("mode", "mode", "{}"),
            ("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("ms", "median ms", "{:.4g}"),
            ("speedup", "vs reference", "{:.2f}x"), ("roofline_ms", "roofline ms", "{:.4g}"),
            ("roofline_frac", "of roofline", "{:.1%}"), ("tflops", "TFLOP/s", "{:.3g}"),
            ("flop_frac", "of peak FLOPs", "{:.1%}"),
            ("vs_fla", "vs fla", "{:.2f}x"))


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
  if args.max_memory_gb is not None and args.max_memory_gb <= 0:
    parser.error(f"--max-memory-gb must be > 0; got {args.max_memory_gb}")
  try:
    jnp.dtype(args.dtype)
  except TypeError:
    parser.error(f"--dtype: unknown dtype {args.dtype!r}")
  info = device_info()
  source = "set by --bandwidth-gbs"
  if args.bandwidth_gbs is None and info["platform"] != "cpu":
    args.bandwidth_gbs, source = measure_bandwidth_gbs(), "measured by a copy"
  elif args.bandwidth_gbs is None:
    args.bandwidth_gbs = default_bandwidth_gbs(info["platform"], info["device_kind"])
    source = "nominal for this device; set --bandwidth-gbs"
  args.max_memory_bytes = (default_memory_budget_bytes() if args.max_memory_gb is None
                           else int(args.max_memory_gb * 1e9))
  args.peak_tflops = peak_tflops(info["platform"], info["device_kind"], args.dtype)
  peak = "-" if args.peak_tflops is None else f"{args.peak_tflops:g} TFLOP/s"
  print(f"platform {info['platform']}, device {info['device_kind']} x{info['num_devices']}, "
        f"jax {jax.__version__}, bandwidth {args.bandwidth_gbs:.4g} GB/s ({source}), "
        f"peak {peak} ({args.dtype})")
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
