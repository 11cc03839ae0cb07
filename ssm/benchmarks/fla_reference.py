"""Timings of flash-linear-attention's Triton kernels (PyTorch) on the shapes of the `gated_delta`
and `ssd` benchmarks, so those print the ratio of our kernels against them.

Only used when `torch` (with CUDA) and `fla` are importable: they are installed where a benchmark
runs (`pip install torch flash-linear-attention`), never a dependency of this project. Layouts are
fla's default [batch, T, heads, dim]:

  gated delta:  chunk_gated_delta_rule(q, k, v, g, beta), unit-norm keys, g = log decay per head
  SSD:          chunk_simple_gla(q=C, k=B, v=x dt, g=dt A): the SSD recurrence
                h_t = exp(dt_t A) h_{t-1} + B_t (x_t dt_t)^T, y_t = C_t^T h_t, is simple GLA with
                a scalar log decay per head and scale 1 (B, C per head: ngroups = heads)
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable


def available() -> bool:
  """True when torch with a CUDA device and fla can be imported."""
  if importlib.util.find_spec("fla") is None or importlib.util.find_spec("torch") is None:
    return False
  import torch
  return torch.cuda.is_available()


def _time(run: Callable[[], None], repeats: int, warmup: int) -> tuple[list[float], float]:
  """(per-call ms from CUDA events, first-call ms) for `run`, which launches the work."""
  import torch
  start = time.perf_counter()
  run()
  torch.cuda.synchronize()
  first_ms = (time.perf_counter() - start) * 1e3
  for _ in range(warmup - 1):
    run()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    run()
    end.record()
    torch.cuda.synchronize()
    times.append(begin.elapsed_time(end))
  return times, first_ms


def _inputs(shapes: dict[str, tuple[int, ...]], dtype: str, grad: bool):
  import torch
  torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
  gen = torch.Generator(device="cuda").manual_seed(0)
  return {name: torch.randn(shape, device="cuda", dtype=torch.float32, generator=gen).to(
      torch_dtype).requires_grad_(grad) for name, shape in shapes.items()}


def _forward_or_backward(forward: Callable[[], "object"], grad: bool) -> Callable[[], None]:
  """A run of forward(), or of forward() and its backward with a cotangent of ones."""
  import torch

  def run():
    out = forward()
    if grad:
      out.backward(gradient=torch.ones_like(out))
  return run


def gated_delta_times(batch: int, length: int, heads: int, dim: int, dtype: str, grad: bool,
                      repeats: int, warmup: int) -> tuple[list[float], float]:
  """fla `chunk_gated_delta_rule` on q, k, v [batch, length, heads, dim]."""
  import torch.nn.functional as F
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule
  shape = (batch, length, heads, dim)
  t = _inputs({"q": shape, "k": shape, "v": shape, "g": shape[:3], "beta": shape[:3]}, dtype, grad)
  forward = lambda: chunk_gated_delta_rule(
      t["q"], F.normalize(t["k"], p=2, dim=-1), t["v"], F.logsigmoid(t["g"]),
      t["beta"].sigmoid())[0]
  return _time(_forward_or_backward(forward, grad), repeats, warmup)


def simple_gla_times(batch: int, length: int, heads: int, head_dim: int, state: int, dtype: str,
                     grad: bool, repeats: int, warmup: int) -> tuple[list[float], float]:
  """fla `chunk_simple_gla` standing in for the SSD: q/k [batch, length, heads, state], v
  [batch, length, heads, head_dim], g [batch, length, heads]."""
  import torch.nn.functional as F
  from fla.ops.simple_gla import chunk_simple_gla
  qk = (batch, length, heads, state)
  t = _inputs({"q": qk, "k": qk, "v": (batch, length, heads, head_dim),
               "g": (batch, length, heads)}, dtype, grad)
  forward = lambda: chunk_simple_gla(t["q"], t["k"], t["v"], g=F.logsigmoid(t["g"]),
                                     scale=1.0)[0]
  return _time(_forward_or_backward(forward, grad), repeats, warmup)
