"""ssm.benchmarks.long_conv: the fft_conv and long_conv_layers ops run at tiny sizes and report
every implementation (no timing thresholds)."""

from __future__ import annotations

import json

import pytest

from ssm import bench


@pytest.mark.parametrize("grad", [False, True])
def test_long_conv_ops(tmp_path, grad):
  out = tmp_path / "bench.json"
  argv = ["--ops", "fft_conv,long_conv_layers", "--lengths", "16,40", "--batch", "1",
          "--features", "4", "--conv-direct-max", "20", "--repeats", "1", "--warmup", "1",
          "--json", str(out)] + (["--grad"] if grad else [])
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  assert {(r["op"], r["impl"], r["shape"]) for r in rows} == {
      ("fft_conv", "direct", "1x16x4"), ("fft_conv", "fft", "1x16x4"), ("fft_conv", "fft", "1x40x4"),
      ("long_conv_layers", "long_conv", "1x16x4"), ("long_conv_layers", "hyena", "1x16x4"),
      ("long_conv_layers", "long_conv", "1x40x4"), ("long_conv_layers", "hyena", "1x40x4")}
  for r in rows:
    assert r["ms"] > 0 and r["mode"] == ("fwd+bwd" if grad else "fwd")
    if r["impl"] in ("direct", "long_conv"):
      assert r["speedup"] == 1.0
    elif r["shape"] == "1x40x4" and r["op"] == "fft_conv":
      assert r["speedup"] is None  # no direct row past --conv-direct-max
    else:
      assert r["speedup"] > 0
