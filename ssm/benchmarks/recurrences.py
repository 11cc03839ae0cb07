"""Benchmarks of the linear recurrences: `scan` (layers.scan), `selective_scan` (Mamba-1) and
`ssd` (Mamba-2), each implementation against the token-by-token reference."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import jax
import jax.numpy as jnp

from layers import mamba as mamba_lib
from layers import mamba2 as mamba2_lib
from layers import scan as scan_lib
from ssm.bench import (Row, add_ratio_to, compare, fwd_or_grad, int_list, kernel_impls,
                       register, timed_row)
from ssm.benchmarks import fla_reference


# ---------------------------------------------------------------------------------------------
# op "scan": layers.scan, h_t = a_t * h_{t-1} + b_t.

def _scan_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--scan-chunk-sizes", type=int_list, nargs="+", default=[],
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
    ka, kb = jax.random.split(jax.random.key(length))
    a = jax.random.uniform(ka, shape, minval=0.5, maxval=1.0).astype(dtype)
    b = jax.random.normal(kb, shape).astype(dtype)
    fns = {name: fwd_or_grad(lambda a, b, fn=fn: fn(a, b)[0], args) for name, fn in impls.items()}
    # a, b in and h out; with --grad a, b, dh in and da, db out.
    bytes_moved = (5 if args.grad else 3) * a.size * dtype.itemsize
    rows += compare("scan", fns, (a, b), settings=args, bytes_moved=bytes_moved,
                    shape="x".join(map(str, shape)), dtype=dtype.name,
                    mode="fwd+bwd" if args.grad else "fwd")
  return rows


# ---------------------------------------------------------------------------------------------
# ops "selective_scan" (Mamba-1) and "ssd" (Mamba-2): xla (and pallas on GPU/TPU) against the
# token-by-token reference.

def _mamba_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--mamba-state", type=int, default=16,
                      help="state size N of selective_scan (default 16; ssd uses 4N)")
  parser.add_argument("--ssd-head-dim", type=int, default=64, help="ssd head dim P (default 64)")


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
    impls = {name: fwd_or_grad(lambda u, delta, a, b, c, name=name: mamba_lib.selective_scan(
        u, delta, a, b, c, delta_softplus=True, impl=name)[0], args)
             for name in kernel_impls(mamba_lib.IMPLEMENTATIONS)}
    nbytes = u.size * dtype.itemsize
    rows += compare("selective_scan", impls, (u, delta, a, bc[0], bc[1]), settings=args,
                    bytes_moved=(5 if args.grad else 3) * nbytes,  # u, delta (, dy) in; y (, du, dd) out
                    shape=f"{args.batch}x{length}x{d} N={n}", dtype=dtype.name,
                    mode="fwd+bwd" if args.grad else "fwd")
  return rows


@register("ssd", "Mamba-2 SSD, x [batch, L, H, P] with H = features / P, B/C [batch, L, 1, 4N]",
          None)
def bench_ssd(args: argparse.Namespace) -> list[Row]:
  """reference, xla and (GPU/TPU) pallas; with fla importable (CUDA) also fla's
  `chunk_simple_gla` on the same recurrence (B, C per head) and every row's speed relative to
  it. FLOPs of the chunked form (chunk C = 64) per token and head: C B^T and its product with x
  (2 C N + 2 C P), C h and the state update (2 N P each); the backward about twice that."""
  dtype, p, n = jnp.dtype(args.dtype), args.ssd_head_dim, 4 * args.mamba_state
  h = max(args.features // p, 1)
  rows = []
  for length in args.lengths:
    ks = jax.random.split(jax.random.key(length), 4)
    x = jax.random.normal(ks[0], (args.batch, length, h, p), dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (args.batch, length, h), dtype) - 3.0)
    bc = jax.random.normal(ks[2], (2, args.batch, length, 1, n), dtype)
    a = -jnp.exp(jax.random.uniform(ks[3], (h,), minval=0.0, maxval=2.7))
    impls = {name: fwd_or_grad(lambda x, dt, a, b, c, name=name: mamba2_lib.ssd(
        x, dt, a, b, c, impl=name)[0], args)
             for name in kernel_impls(mamba2_lib.IMPLEMENTATIONS)}
    nbytes = x.size * dtype.itemsize
    flops = args.batch * length * h * (2 * 64 * (n + p) + 4 * n * p) * (3 if args.grad else 1)
    fields = dict(settings=args, bytes_moved=(4 if args.grad else 2) * nbytes,  # x (, dy) in;
                  flops=flops, shape=f"{args.batch}x{length}x{h}x{p} N={n}",  # y (, dx) out
                  dtype=dtype.name, mode="fwd+bwd" if args.grad else "fwd")
    new = compare("ssd", impls, (x, dt, a, bc[0], bc[1]), **fields)
    if fla_reference.available():
      times, first = fla_reference.simple_gla_times(args.batch, length, h, p, n, dtype.name,
                                                    args.grad, args.repeats, args.warmup)
      new.append(timed_row("ssd", "fla chunk_simple_gla", times, first, **fields))
      add_ratio_to(new, new[-1], "vs_fla")
    rows += new
  return rows
