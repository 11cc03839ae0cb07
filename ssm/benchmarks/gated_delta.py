"""Benchmarks of the gated delta rule family (layers.gated_delta): `gated_delta` (the op, the
chunked `xla` form against the token-by-token reference) and `gated_deltanet` (the mixer's
parallel form with each implementation of the op)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import jax
import jax.numpy as jnp

from layers import gated_delta as gd_lib
from ssm.bench import (Row, add_ratio_to, compare, fwd_or_grad, int_list, kernel_impls,
                       register, timed_row)
from ssm.benchmarks import fla_reference


def _arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gdn-head-dim", type=int, default=64,
                      help="gated_delta / gated_deltanet head dim (dim_k = dim_v for the op; "
                           "heads = features / head dim; default 64)")
  parser.add_argument("--gdn-chunk-sizes", type=int_list, nargs="+", default=[],
                      help="also time `xla` at these chunk sizes (default: only 64)")


def _heads(args: argparse.Namespace) -> tuple[int, int]:
  d = args.gdn_head_dim
  if d < 1:
    raise ValueError(f"--gdn-head-dim must be >= 1; got {d}")
  return max(args.features // d, 1), d


@register("gated_delta", "gated delta rule, q/k/v [batch, L, H, d] with H = features / "
          "--gdn-head-dim", _arguments)
def bench_gated_delta(args: argparse.Namespace) -> list[Row]:
  """reference, xla (also at --gdn-chunk-sizes) and, on GPU/TPU, pallas, on unit-norm keys, beta
  in (0, 1) and log decays g = -softplus(normal); with fla importable (CUDA) also fla's
  `chunk_gated_delta_rule`, and every row's speed relative to it ("vs fla").

  FLOPs of the chunked form (chunk C = 64) per token and head: K K^T, Q K^T, W = T (beta K) at
  2 C dk each, U = T (beta V) and the intra-chunk output at 2 C dv each, and U - W S, Q S and the
  state update at 2 dk dv each: 6 C dk + 4 C dv + 6 dk dv; the backward about twice that."""
  dtype = jnp.dtype(args.dtype)
  h, d = _heads(args)
  impls: dict[str, Callable[..., Any]] = {
      name: lambda *a, name=name: gd_lib.gated_delta_rule(*a, impl=name)[0]
      for name in kernel_impls(gd_lib.IMPLEMENTATIONS)}
  for c in args.gdn_chunk_sizes:
    impls[f"xla[c={c}]"] = lambda *a, c=c: gd_lib.gated_delta_rule(*a, impl="xla",
                                                                  chunk_size=c)[0]
  rows = []
  for length in args.lengths:
    ks = jax.random.split(jax.random.key(length), 5)
    shape = (args.batch, length, h, d)
    q = jax.random.normal(ks[0], shape, dtype)
    k = jax.random.normal(ks[1], shape)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], shape, dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], shape[:3])).astype(dtype)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], shape[:3])).astype(dtype)
    fns = {name: fwd_or_grad(fn, args) for name, fn in impls.items()}
    # q, k, v in and out written; with --grad also d_out in and dq, dk, dv out.
    bytes_moved = (8 if args.grad else 4) * q.size * dtype.itemsize
    flops = args.batch * length * h * (10 * 64 * d + 6 * d * d) * (3 if args.grad else 1)
    fields = dict(settings=args, bytes_moved=bytes_moved, flops=flops,
                  shape="x".join(map(str, shape)), dtype=dtype.name,
                  mode="fwd+bwd" if args.grad else "fwd")
    new = compare("gated_delta", fns, (q, k, v, g, beta), **fields)
    if fla_reference.available():
      times, first = fla_reference.gated_delta_times(args.batch, length, h, d, dtype.name,
                                                     args.grad, args.repeats, args.warmup)
      new.append(timed_row("gated_delta", "fla chunk_gated_delta_rule", times, first, **fields))
      add_ratio_to(new, new[-1], "vs_fla")
    rows += new
  return rows


@register("gated_deltanet", "GatedDeltaNet mixer on [batch, L, features], heads = features / "
          "--gdn-head-dim, dim_v = 2 dim_k", None)
def bench_gated_deltanet(args: argparse.Namespace) -> list[Row]:
  """The mixer's parallel form (cache=None) with each op implementation; forward, or the
  gradient of <y, cotangent> in the parameters and the input under --grad."""
  h, d = _heads(args)
  rows = []
  for length in args.lengths:
    shape = (args.batch, length, args.features)
    kx, kg = jax.random.split(jax.random.key(length))
    x = jax.random.normal(kx, shape, jnp.dtype(args.dtype))
    cot = jax.random.normal(kg, shape, jnp.dtype(args.dtype))
    modules = {name: gd_lib.GatedDeltaNet(d_model=args.features, num_heads=h, head_dim_k=d,
                                          impl=name)
               for name in kernel_impls(gd_lib.IMPLEMENTATIONS)}
    # Variables are arguments, not closed-over constants, so XLA cannot fold them away.
    variables = jax.jit(modules["xla"].init)(jax.random.key(1), x[:, :8])
    impls = {}
    for name, m in modules.items():
      if args.grad:
        impls[name] = lambda vs, x, cot, m=m: jax.grad(
            lambda v, x: jnp.vdot(m.apply(v, x)[0], cot), argnums=(0, 1))(vs, x)
      else:
        impls[name] = lambda vs, x, cot, m=m: m.apply(vs, x)[0]
    nbytes = x.size * x.dtype.itemsize
    rows += compare("gated_deltanet", impls, (variables, x, cot), settings=args,
                    bytes_moved=(4 if args.grad else 2) * nbytes, shape="x".join(map(str, shape)),
                    dtype=x.dtype.name, mode="fwd+bwd" if args.grad else "fwd")
  return rows
