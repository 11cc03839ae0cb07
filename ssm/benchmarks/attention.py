"""Benchmark of attention: `window_attention` (layers.attention), the blocked xla form against the
dense masked reference, forward or (--grad) forward + backward."""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from layers import attention as attention_lib
from ssm.bench import Row, compare, fwd_or_grad, register


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


@register("window_attention", "causal sliding-window attention q [batch, L, H, D], "
          "H = features / D: blocked xla against the dense reference", _attention_arguments)
def bench_window_attention(args: argparse.Namespace) -> list[Row]:
  """Rows for `reference` (dense scores under the window mask) and `xla` (blocked) at every
  length; the dense rows are left out where their scores would not fit (see --attn-dense-max-gb),
  and the xla speedup is then None."""
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
    names = ["xla"]
    dense_gb = args.batch * heads * length * length * 4 * (3 if args.grad else 1) / 1e9
    if dense_gb <= args.attn_dense_max_gb:
      names.insert(0, "reference")
    else:
      print(f"window_attention: L={length}: dense reference skipped ({dense_gb:.1f} GB of "
            f"scores > --attn-dense-max-gb {args.attn_dense_max_gb:g})", file=sys.stderr)
    fns = {name: fwd_or_grad(lambda q, k, v, name=name: attention_lib.window_attention(
        q, k, v, window=window, impl=name, block_size=block), args) for name in names}
    qo_bytes, kv_bytes = q.size * dtype.itemsize, k.size * dtype.itemsize
    # q, k, v in and out written; with --grad also dout in and dq, dk, dv out.
    bytes_moved = (2 * qo_bytes + 2 * kv_bytes) * (2 if args.grad else 1)
    rows += compare("window_attention", fns, (q, k, v), settings=args, bytes_moved=bytes_moved,
                    shape=f"{args.batch}x{length}x{heads}x{d} kv={kv_heads} w={window}",
                    dtype=dtype.name, mode="fwd+bwd" if args.grad else "fwd")
  return rows
