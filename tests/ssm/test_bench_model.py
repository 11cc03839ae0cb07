"""ssm.benchmarks.model: the model_compile op reports a compile time for every depth, scanned and
unrolled (no timing thresholds)."""

from __future__ import annotations

import json

from ssm import bench


def test_model_compile_rows(tmp_path):
  out = tmp_path / "bench.json"
  argv = ["--ops", "model_compile", "--compile-preset", "mamba", "--compile-depths", "1,2",
          "--lengths", "8", "--batch", "1", "--json", str(out)]
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["impl"], r["shape"]) for r in rows] == [
      ("scan", "1 blocks"), ("scan", "2 blocks"), ("unrolled", "1 blocks"), ("unrolled", "2 blocks")]
  assert rows[0]["speedup"] == 1.0 and all(r["ms"] > 0 for r in rows)
