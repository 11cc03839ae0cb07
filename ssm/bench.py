"""Kernel benchmarks: `python -m ssm bench [--ops scan ...]`.

Each op registers a benchmark case (`register`) that times the op's implementations against each
other on the current device and returns one row per (implementation, shape, mode). Every row
carries the median time, the speedup over the op's reference implementation measured in the same
run (reference_ms / ms, so the reference itself is exactly 1), and a roofline estimate: the
compulsory bytes (inputs read once, outputs written once) over the memory bandwidth.

Timing claims live here, in the printed table and the JSON file, never in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layers import hippo
from layers import mamba as mamba_lib
from layers import mamba2 as mamba2_lib
from layers import s4 as s4_lib
from layers import s4d as s4d_lib
from layers import s5 as s5_lib
from layers import scan as scan_lib

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
# op "scan": layers.scan, h_t = a_t * h_{t-1} + b_t.

def _scan_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--scan-chunk-sizes", type=_int_list, nargs="+", default=[],
                      help="also time `chunked` at these chunk sizes (default: only the "
                           "default chunk size)")


@register("scan", "linear recurrence h_t = a_t*h_{t-1} + b_t, [batch, length, features]",
          _scan_arguments)
def bench_scan(args: argparse.Namespace) -> list[Row]:
  """Rows for every implementation in `layers.scan.IMPLEMENTATIONS`, at every length."""
  dtype = jnp.dtype(args.dtype)
  impls: dict[str, Callable[..., Any]] = dict(scan_lib.IMPLEMENTATIONS)
  for c in args.scan_chunk_sizes:
    impls[f"chunked[c={c}]"] = lambda a, b, c=c: scan_lib.linear_scan_chunked(a, b, chunk_size=c)
  rows = []
  for length in args.lengths:
    shape = (args.batch, length, args.features)
    ka, kb, kg = jax.random.split(jax.random.key(length), 3)
    a = jax.random.uniform(ka, shape, minval=0.5, maxval=1.0).astype(dtype)
    b = jax.random.normal(kb, shape).astype(dtype)
    nbytes = a.size * dtype.itemsize
    if args.grad:
      g = jax.random.normal(kg, shape).astype(dtype)
      fns = {name: _vjp_of(fn) for name, fn in impls.items()}
      call_args, bytes_moved, mode = (a, b, g), 5 * nbytes, "fwd+bwd"  # a, b, g in; da, db out
    else:
      fns = {name: (lambda a, b, fn=fn: fn(a, b)[0]) for name, fn in impls.items()}
      call_args, bytes_moved, mode = (a, b), 3 * nbytes, "fwd"  # a, b in; h out
    rows += compare("scan", fns, call_args, settings=args, bytes_moved=bytes_moved,
                    shape="x".join(map(str, shape)), dtype=dtype.name, mode=mode)
  return rows


def _vjp_of(fn: Callable[..., Any]) -> Callable[..., Any]:
  def fwd_bwd(a: jax.Array, b: jax.Array, g: jax.Array) -> Any:
    _, pullback = jax.vjp(lambda a, b: fn(a, b)[0], a, b)
    return pullback(g)
  return fwd_bwd


# ---------------------------------------------------------------------------------------------
# ops "s4_kernels" and "s4_layers": the S4 family (layers.s4, layers.s4d, layers.s5).

def _s4_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--s4-state", type=int, default=64,
                      help="state size N of the S4-family ops (default 64)")


@register("s4_kernels", "S4-family convolution kernels [L, H] generated from the parameters",
          _s4_arguments)
def bench_s4_kernels(args: argparse.Namespace) -> list[Row]:
  """The DPLR kernel (Cauchy + Woodbury + FFT, HiPPO-LegS) against S4D's Vandermonde kernel with
  the same diagonal part, H = --features channels, N = --s4-state. Reference: the DPLR kernel."""
  h, n = args.features, args.s4_state
  lam, p, b, _ = hippo.nplr("legs", n)  # [N/2], [1, N/2], [N/2]: shared by all H channels
  lam, b = (jnp.asarray(np.broadcast_to(z, (h, n // 2)), jnp.complex64) for z in (lam, b))
  p = jnp.asarray(np.broadcast_to(p[:, None], (p.shape[0], h, n // 2)), jnp.complex64)
  kc, kd = jax.random.split(jax.random.key(0))
  c = jax.lax.complex(*jax.random.normal(kc, (2, 1, h, n // 2)))
  dt = jnp.exp(jax.random.uniform(kd, (h,), minval=math.log(1e-3), maxval=math.log(1e-1)))
  rows = []
  for length in args.lengths:
    impls = {
        "s4_dplr": lambda dt, lam, p, b, c, length=length: s4_lib.s4_kernel_bilinear(
            dt, lam, p, b, c, length, chunk_size=512),
        "s4d_vandermonde": lambda dt, lam, p, b, c, length=length: s4d_lib.s4d_kernel(
            dt, lam, b, c, length),
    }
    rows += compare("s4_kernels", impls, (dt, lam, p, b, c), settings=args,
                    bytes_moved=length * h * 4,
                    reference="s4_dplr", shape=f"{length}x{h} N={n}", dtype="float32", mode="fwd")
  return rows


@register("s4_layers", "S4 / S4D / S5 layer forward (or fwd+bwd) on [batch, L, H]", None)
def bench_s4_layers(args: argparse.Namespace) -> list[Row]:
  """Whole layers in their parallel form (convolution for S4/S4D, scan for S5), N = --s4-state.
  Reference: S4D."""
  h, n = args.features, args.s4_state
  modules = {"s4d": s4d_lib.S4D(d_model=h, d_state=n), "s4": s4_lib.S4(d_model=h, d_state=n),
             "s5": s5_lib.S5(d_model=h, d_state=n)}
  rows = []
  for length in args.lengths:
    shape = (args.batch, length, h)
    kx, kg = jax.random.split(jax.random.key(length))
    x = jax.random.normal(kx, shape, jnp.dtype(args.dtype))
    g = jax.random.normal(kg, shape, jnp.dtype(args.dtype))
    # Variables are arguments, not closed-over constants, so XLA cannot fold the kernels away.
    variables = {name: jax.jit(m.init)(jax.random.key(1), x[:, :8]) for name, m in modules.items()}
    impls = {}
    for name, m in modules.items():
      if args.grad:
        impls[name] = lambda vs, x, g, m=m, name=name: jax.grad(
            lambda v, x: jnp.vdot(m.apply(v, x)[0], g), argnums=(0, 1))(vs[name], x)
      else:
        impls[name] = lambda vs, x, g, m=m, name=name: m.apply(vs[name], x)[0]
    nbytes = x.size * x.dtype.itemsize
    rows += compare("s4_layers", impls, (variables, x, g), settings=args, reference="s4d",
                    bytes_moved=(4 if args.grad else 2) * nbytes, shape="x".join(map(str, shape)),
                    dtype=x.dtype.name, mode="fwd+bwd" if args.grad else "fwd")
  return rows


# ---------------------------------------------------------------------------------------------
# ops "selective_scan" (Mamba-1) and "ssd" (Mamba-2): xla against the token-by-token reference.

def _mamba_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--mamba-state", type=int, default=16,
                      help="state size N of selective_scan (default 16; ssd uses 4N)")
  parser.add_argument("--ssd-head-dim", type=int, default=64, help="ssd head dim P (default 64)")


def _fwd_or_grad(fn: Callable[..., Any], args: argparse.Namespace) -> Callable[..., Any]:
  """fn(*inputs) -> y; forward only, or y's VJP with respect to every input under --grad."""
  if not args.grad:
    return fn
  def fwd_bwd(*inputs):
    y, pullback = jax.vjp(fn, *inputs)
    return pullback(jnp.ones_like(y))
  return fwd_bwd


@register("selective_scan", "Mamba-1 selective scan, u/delta [batch, L, D], B/C [batch, L, N]",
          _mamba_arguments)
def bench_selective_scan(args: argparse.Namespace) -> list[Row]:
  dtype, d, n = jnp.dtype(args.dtype), args.features, args.mamba_state
  rows = []
  for length in args.lengths:
    ks = jax.random.split(jax.random.key(length), 5)
    u = jax.random.normal(ks[0], (args.batch, length, d), dtype)
    delta = jax.random.normal(ks[1], (args.batch, length, d), dtype)
    bc = jax.random.normal(ks[2], (2, args.batch, length, n), dtype)
    a = -jnp.exp(jax.random.normal(ks[3], (d, n)))
    impls = {name: _fwd_or_grad(lambda u, delta, a, b, c, name=name: mamba_lib.selective_scan(
        u, delta, a, b, c, delta_softplus=True, impl=name)[0], args)
             for name in mamba_lib.IMPLEMENTATIONS}
    nbytes = u.size * dtype.itemsize
    rows += compare("selective_scan", impls, (u, delta, a, bc[0], bc[1]), settings=args,
                    bytes_moved=(5 if args.grad else 3) * nbytes,  # u, delta (, dy) in; y (, du, dd) out
                    shape=f"{args.batch}x{length}x{d} N={n}", dtype=dtype.name,
                    mode="fwd+bwd" if args.grad else "fwd")
  return rows


@register("ssd", "Mamba-2 SSD, x [batch, L, H, P] with H = features / P, B/C [batch, L, 1, 4N]",
          None)
def bench_ssd(args: argparse.Namespace) -> list[Row]:
  dtype, p, n = jnp.dtype(args.dtype), args.ssd_head_dim, 4 * args.mamba_state
  h = max(args.features // p, 1)
  rows = []
  for length in args.lengths:
    ks = jax.random.split(jax.random.key(length), 4)
    x = jax.random.normal(ks[0], (args.batch, length, h, p), dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (args.batch, length, h), dtype) - 3.0)
    bc = jax.random.normal(ks[2], (2, args.batch, length, 1, n), dtype)
    a = -jnp.exp(jax.random.uniform(ks[3], (h,), minval=0.0, maxval=2.7))
    impls = {name: _fwd_or_grad(lambda x, dt, a, b, c, name=name: mamba2_lib.ssd(
        x, dt, a, b, c, impl=name)[0], args) for name in mamba2_lib.IMPLEMENTATIONS}
    nbytes = x.size * dtype.itemsize
    rows += compare("ssd", impls, (x, dt, a, bc[0], bc[1]), settings=args,
                    bytes_moved=(4 if args.grad else 2) * nbytes,  # x (, dy) in; y (, dx) out
                    shape=f"{args.batch}x{length}x{h}x{p} N={n}", dtype=dtype.name,
                    mode="fwd+bwd" if args.grad else "fwd")
  return rows


# ---------------------------------------------------------------------------------------------
# Command line.

def _int_list(text: str) -> list[int]:
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
  parser = argparse.ArgumentParser(
      prog="python -m ssm bench",
      description="Time each op's implementations against each other and the roofline.")
  ops = ", ".join(f"{c.name} ({c.description})" for c in CASES.values())
  parser.add_argument("--ops", type=_str_list, nargs="+", default=[["scan"]],
                      help=f"ops to benchmark (default: scan). Known: {ops}")
  parser.add_argument("--lengths", type=_int_list, nargs="+", default=[[1024, 4096, 16384]],
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
