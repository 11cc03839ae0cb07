"""Benchmarks of the S4 family: `s4_kernels` (the DPLR kernel against S4D's Vandermonde kernel)
and `s4_layers` (S4, S4D and S5 layers in their parallel form)."""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from layers import hippo
from layers import s4 as s4_lib
from layers import s4d as s4d_lib
from layers import s5 as s5_lib
from ssm.bench import Row, compare, register


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
