"""ssm.bench ops `gated_delta` and `gated_deltanet` run end to end at tiny sizes: a row for every
implementation, positive times, the reference's speedup exactly 1. No timing thresholds."""

from __future__ import annotations

import json

import pytest

from layers import gated_delta
from ssm import bench


@pytest.mark.parametrize("grad", [False, True])
def test_gated_delta_ops(tmp_path, grad):
  out = tmp_path / "bench.json"
  argv = ["--ops", "gated_delta,gated_deltanet", "--lengths", "12", "--batch", "1",
          "--features", "8", "--gdn-head-dim", "4", "--gdn-chunk-sizes", "4", "--repeats", "1",
          "--warmup", "1", "--json", str(out)] + (["--grad"] if grad else [])
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  impls = set(bench.kernel_impls(gated_delta.IMPLEMENTATIONS))  # no pallas timings on CPU
  assert {(r["op"], r["impl"]) for r in rows} == (
      {("gated_delta", i) for i in impls | {"xla[c=4]"}} | {("gated_deltanet", i) for i in impls})
  for r in rows:
    assert r["ms"] > 0 and r["mode"] == ("fwd+bwd" if grad else "fwd")
    assert r["shape"] == ("1x12x2x4" if r["op"] == "gated_delta" else "1x12x8")
    if r["impl"] == "reference":
      assert r["speedup"] == 1.0
    else:
      assert r["speedup"] > 0
