"""Benchmark of attention: `window_attention` (layers.attention), the blocked xla form and (on
GPU/TPU) the Pallas kernel against the dense masked reference and `jax.nn.dot_product_attention`,
forward or (--grad) forward + backward, with TFLOP/s counting only the in-window work."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from layers import attention as attention_lib
from ssm.bench import Row, compare, fwd_or_grad, kernel_impls, register


def _attention_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--attn-window", type=int, default=1024,
                      help="attention window in tokens; 0 for global causal attention "
                           "(default 1024)")
  parser.add_argument("--attn-head-dim", type=int, default=64,
                      help="head dim D; heads H = features / D (default 64)")
  parser.add_argument("--attn-kv-heads", type=int, default=0,
                      help="key/value heads (GQA); 0 for as many as query heads (default 0)")
  parser.add_argument("--attn-block-size", type=int, default=128,
                      help="block size of the xla form (default 128)")
  parser.add_argument("--attn-dense-max-gb", type=float, default=4.0,
                      help="skip the dense reference where its float32 scores (x3 with --grad) "
                           "would pass this many GB (default 4)")


def visible_pairs(length: int, window: int | None) -> int:
  """(query, key) pairs a causal window of `window` tokens (None: global) attends over L tokens:
  sum_i min(i + 1, w)."""
  i = np.arange(length, dtype=np.int64)
  return int(np.sum(i + 1 if window is None else np.minimum(i + 1, window)))


def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None,
                           args: argparse.Namespace) -> tuple[str, Callable[..., Any]]:
  """(row name, fn) for `jax.nn.dot_product_attention` with the same causal window: cuDNN on GPU
  where it compiles the call (it takes bf16/fp16, not float32), else the default XLA form."""
  def make(implementation):
    return fwd_or_grad(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation), args)

  if jax.default_backend() == "gpu":
    fn = make("cudnn")
    try:
      jax.jit(fn).lower(q, k, v).compile()
      return "dot_product_attention[cudnn]", fn
    except Exception as e:  # noqa: BLE001 (cuDNN rejects by many exception types)
      print(f"window_attention: cuDNN dot_product_attention refused the call ({type(e).__name__}:"
            f" {str(e)[:200]}); timing the xla form", file=sys.stderr)
  return "dot_product_attention[xla]", make(None)


@register("window_attention", "causal sliding-window attention q [batch, L, H, D], "
          "H = features / D: blocked xla, pallas (GPU/TPU) and jax.nn.dot_product_attention "
          "against the dense reference", _attention_arguments)
def bench_window_attention(args: argparse.Namespace) -> list[Row]:
  """Rows for `reference` (dense scores under the window mask), `xla` (blocked), `pallas` (the
  kernel, GPU/TPU only: `kernel_impls`) and `jax.nn.dot_product_attention` with the same window
  (`dot_product_attention[cudnn]` on GPU where cuDNN takes the call, else `[xla]`) at every
  length. The dense rows (the reference and dot_product_attention's xla form, which also builds
  [L, L] logits) are left out where their scores would not fit (see --attn-dense-max-gb); the
  speedups are then None.

  FLOPs count only in-window work: 2 (D + Dv) per visible (query, key) pair for the forward (q.k
  and p v), and 2 (4 D + 3 Dv) with the backward (which recomputes q.k and adds dv, dp, dq, dk:
  3.5 times the forward); `tflops` is that over the median time."""
  dtype, d, block = jnp.dtype(args.dtype), args.attn_head_dim, args.attn_block_size
  heads = max(args.features // d, 1)
  kv_heads = args.attn_kv_heads or heads
  window = args.attn_window or None
  if heads % kv_heads or (window is not None and window < 0) or block < 1:
    raise ValueError(f"window_attention bench: need heads ({heads}) % --attn-kv-heads "
                     f"({kv_heads}) == 0, --attn-window >= 0 and --attn-block-size >= 1")
  rows = []
  for length in args.lengths:
    kq, kk, kv = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(kq, (args.batch, length, heads, d), dtype)
    k = jax.random.normal(kk, (args.batch, length, kv_heads, d), dtype)
    v = jax.random.normal(kv, (args.batch, length, kv_heads, d), dtype)
    names = kernel_impls(attention_lib.IMPLEMENTATIONS)
    dpa_name, dpa = _dot_product_attention(q, k, v, window, args)
    dense_gb = args.batch * heads * length * length * 4 * (3 if args.grad else 1) / 1e9
    if dense_gb > args.attn_dense_max_gb:
      names.remove("reference")
      skipped = "dense reference" + (" and dot_product_attention[xla]"
                                     if dpa_name.endswith("[xla]") else "")
      print(f"window_attention: L={length}: {skipped} skipped ({dense_gb:.1f} GB of "
            f"scores > --attn-dense-max-gb {args.attn_dense_max_gb:g})", file=sys.stderr)
    fns = {name: fwd_or_grad(lambda q, k, v, name=name: attention_lib.window_attention(
        q, k, v, window=window, impl=name, block_size=block), args) for name in names}
    if dense_gb <= args.attn_dense_max_gb or not dpa_name.endswith("[xla]"):
      fns[dpa_name] = dpa
    qo_bytes, kv_bytes = q.size * dtype.itemsize, k.size * dtype.itemsize
    # q, k, v in and out written; with --grad also dout in and dq, dk, dv out.
    bytes_moved = (2 * qo_bytes + 2 * kv_bytes) * (2 if args.grad else 1)
    flops = 2 * visible_pairs(length, window) * args.batch * heads * (
        (4 * d + 3 * d) if args.grad else (d + d))
    new = compare("window_attention", fns, (q, k, v), settings=args, bytes_moved=bytes_moved,
                  flops=flops, shape=f"{args.batch}x{length}x{heads}x{d} kv={kv_heads} w={window}",
                  dtype=dtype.name, mode="fwd+bwd" if args.grad else "fwd")
    rows += new
  return rows
