"""Benchmarks of the long convolutions: `fft_conv` (the FFT path against the direct convolution,
which packed and streamed inputs use) and `long_conv_layers` (the LongConv and Hyena mixers)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from layers import long_conv
from layers.explicit_long_conv import LongConv
from layers.hyena import Hyena
from ssm.bench import Row, compare, fwd_or_grad, register


def _arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--conv-direct-max", type=int, default=8192,
                      help="time the direct convolution (O(L^2)) only up to this length "
                           "(default 8192); longer rows have the FFT alone and no speedup")


@register("fft_conv", "causal depthwise convolution u [batch, L, C] by a kernel [L, C]: FFT vs "
          "direct (the path of packed and streamed inputs)", _arguments)
def bench_fft_conv(args: argparse.Namespace) -> list[Row]:
  dtype, c = jnp.dtype(args.dtype), args.features
  rows = []
  for length in args.lengths:
    ku, kk = jax.random.split(jax.random.key(length))
    u = jax.random.normal(ku, (args.batch, length, c), dtype)
    k = jax.random.normal(kk, (length, c), jnp.float32) / length ** 0.5
    impls = {"fft": fwd_or_grad(lambda u, k: long_conv.fft_conv(u, k), args)}
    if length <= args.conv_direct_max:
      impls = {"direct": fwd_or_grad(lambda u, k: long_conv.direct_conv(u, k), args), **impls}
    nbytes = u.size * dtype.itemsize
    rows += compare("fft_conv", impls, (u, k), settings=args, reference="direct",
                    bytes_moved=(4 if args.grad else 2) * nbytes + 2 * k.size * 4,
                    shape=f"{args.batch}x{length}x{c}", dtype=dtype.name,
                    mode="fwd+bwd" if args.grad else "fwd")
  return rows


@register("long_conv_layers", "LongConv and Hyena (order 2) mixers, parallel form, on "
          "[batch, L, features]; reference: LongConv", None)
def bench_long_conv_layers(args: argparse.Namespace) -> list[Row]:
  h = args.features
  rows = []
  for length in args.lengths:
    modules = {"long_conv": LongConv(d_model=h, max_length=length),
               "hyena": Hyena(d_model=h, max_length=length)}
    x = jax.random.normal(jax.random.key(length), (args.batch, length, h), jnp.dtype(args.dtype))
    variables = {name: jax.jit(m.init)(jax.random.key(1), x[:, :8]) for name, m in modules.items()}
    impls = {}
    for name, m in modules.items():
      # Variables are arguments (not constants XLA could fold); under --grad both get gradients.
      impls[name] = fwd_or_grad(lambda vs, x, m=m, name=name: m.apply(vs[name], x)[0], args)
    nbytes = x.size * x.dtype.itemsize
    rows += compare("long_conv_layers", impls, (variables, x), settings=args,
                    reference="long_conv", bytes_moved=(4 if args.grad else 2) * nbytes,
                    shape=f"{args.batch}x{length}x{h}", dtype=x.dtype.name,
                    mode="fwd+bwd" if args.grad else "fwd")
  return rows
