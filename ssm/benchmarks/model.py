"""Benchmark of whole models: `model_compile`, the compile time of a training step (loss and
gradient) by depth, with the repeated groups scanned (`nn.scan`) and unrolled."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from ssm import config as config_lib
from ssm import model as model_lib
from ssm import presets
from ssm.bench import Row, int_list, register


def _arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--compile-preset", default="samba",
                      help="model preset, at size tiny (default samba; one of "
                           f"{', '.join(presets.PRESETS)})")
  parser.add_argument("--compile-depths", type=int_list, nargs="+", default=[[4, 48]],
                      help="numbers of blocks to compile (default 4,48)")


@register("model_compile", "compile time of a training step of a tiny preset model by depth, "
          "scanned vs unrolled groups; reference: the shallowest scanned model", _arguments)
def bench_model_compile(args: argparse.Namespace) -> list[Row]:
  depths = args.compile_depths
  section = presets.model_preset(args.compile_preset, "tiny")
  n_entries = len(section["pattern"].split(","))
  tokens = jnp.zeros((args.batch, min(args.lengths)), jnp.int32)
  rows = []
  # The first compilation in a process pays one-time costs; time from the second on.
  for scan, depth in [(True, depths[0])] + [(s, d) for s in (True, False) for d in depths]:
    n_layers = max(n_entries, depth // n_entries * n_entries)
    config = config_lib.build(model=dict(section, n_layers=n_layers, scan_layers=scan))
    model = model_lib.build_model(config.model, num_outputs=256, vocab_size=256)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
    loss = lambda p, t: jnp.mean(model.apply(p, t)[0] ** 2)
    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    ms = (time.perf_counter() - start) * 1e3
    rows.append({"op": "model_compile", "impl": "scan" if scan else "unrolled",
                 "mode": "fwd+bwd", "shape": f"{n_layers} blocks", "dtype": "float32", "ms": ms})
  rows = rows[1:]
  ref = rows[0]["ms"]
  for r in rows:
    r["speedup"] = ref / r["ms"]  # < 1: slower to compile than the shallowest scanned model
  return rows
