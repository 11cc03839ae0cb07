"""ssm bench --ops window_attention: runs end to end at tiny sizes, a row per implementation (pallas
only on GPU/TPU) and for jax.nn.dot_product_attention, with in-window FLOPs and TFLOP/s."""

from __future__ import annotations

import json

import pytest

from layers import attention
from ssm import bench


@pytest.mark.parametrize("grad", [False, True])
def test_window_attention_rows(tmp_path, grad):
  out = tmp_path / "bench.json"
  argv = ["--ops", "window_attention", "--lengths", "20,9", "--batch", "1", "--features", "8",
          "--attn-head-dim", "4", "--attn-kv-heads", "1", "--attn-window", "5",
          "--attn-block-size", "4", "--repeats", "1", "--warmup", "1",
          "--json", str(out)] + (["--grad"] if grad else [])
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  impls = bench.kernel_impls(attention.IMPLEMENTATIONS) + ["dot_product_attention[xla]"]
  assert {(r["shape"], r["impl"]) for r in rows} == {
      (f"1x{n}x2x4 kv=1 w=5", impl) for n in (20, 9) for impl in impls}
  for r in rows:
    assert r["op"] == "window_attention" and r["mode"] == ("fwd+bwd" if grad else "fwd")
    assert r["ms"] > 0 and r["bytes"] > 0
    assert r["speedup"] == 1.0 if r["impl"] == "reference" else r["speedup"] > 0
    # In-window pairs only: sum_i min(i + 1, 5), times 2 (D + Dv) = 16 per pair and head (56
    # with the backward), 2 heads.
    pairs = {20: 90, 9: 35}[int(r["shape"].split("x")[1])]
    assert r["flops"] == pairs * 2 * (56 if grad else 16)
    assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e9))


def test_dense_reference_is_skipped_when_too_large(tmp_path, capsys):
  out = tmp_path / "bench.json"
  argv = ["--ops", "window_attention", "--lengths", "16", "--batch", "1", "--features", "4",
          "--attn-head-dim", "4", "--attn-window", "0", "--attn-dense-max-gb", "1e-9",
          "--repeats", "1", "--warmup", "1", "--json", str(out)]
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["impl"], r["speedup"], r["shape"]) for r in rows] == [
      ("xla", None, "1x16x1x4 kv=1 w=None")]  # and no dense dot_product_attention[xla] row
  assert rows[0]["flops"] == 16 * 17 // 2 * 16  # global causal: L (L + 1) / 2 pairs
  assert "dense reference and dot_product_attention[xla] skipped" in capsys.readouterr().err
