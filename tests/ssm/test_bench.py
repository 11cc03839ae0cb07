"""ssm.bench: the command runs end to end at tiny sizes and reports every implementation.

No timing thresholds: only that the numbers exist, are positive, and are internally consistent.
"""

from __future__ import annotations

import json

import jax
import pytest

from layers import scan
from ssm import bench

TINY = ["--ops", "scan", "--lengths", "16,24", "--batch", "2", "--features", "3",
        "--repeats", "2", "--warmup", "1"]


@pytest.mark.parametrize("grad", [False, True])
def test_scan_rows_and_table(tmp_path, capsys, grad):
  out = tmp_path / "bench.json"
  argv = TINY + ["--json", str(out), "--scan-chunk-sizes", "4"] + (["--grad"] if grad else [])
  assert bench.main(argv) == 0
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())

  assert report["device"]["platform"] and report["jax_version"] and report["date"]
  rows = report["rows"]
  expected_impls = set(scan.IMPLEMENTATIONS) | {"chunked[c=4]"}
  mode = "fwd+bwd" if grad else "fwd"
  for shape in ["2x16x3", "2x24x3"]:
    at_shape = {r["impl"]: r for r in rows if r["shape"] == shape}
    assert set(at_shape) == expected_impls
    assert at_shape["reference"]["speedup"] == 1.0
    for r in at_shape.values():
      assert r["op"] == "scan" and r["mode"] == mode and r["dtype"] == "float32"
      assert r["ms"] > 0 and r["min_ms"] > 0 and r["first_call_ms"] > 0
      assert r["speedup"] == pytest.approx(at_shape["reference"]["ms"] / r["ms"])
      batch, length, features = map(int, shape.split("x"))
      # float32 a, b in and h out; with --grad a, b, dh in and da, db out.
      assert r["bytes"] == (5 if grad else 3) * batch * length * features * 4
      bandwidth = report["settings"]["bandwidth_gbs"]
      assert r["roofline_ms"] == pytest.approx(r["bytes"] / (bandwidth * 1e9) * 1e3)
  table_lines = printed.splitlines()
  for impl in expected_impls:
    assert any(impl in line.split() for line in table_lines), impl
  assert report["device"]["platform"] in table_lines[0]


def test_bandwidth_flag_sets_roofline(tmp_path):
  out = tmp_path / "bench.json"
  assert bench.main(TINY + ["--lengths", "8", "--bandwidth-gbs", "2.5", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert {r["shape"] for r in rows} == {"2x8x3"}  # a repeated flag overrides, as in argparse
  for r in rows:
    assert r["roofline_ms"] == pytest.approx(r["bytes"] / 2.5e9 * 1e3)


def test_default_bandwidth_by_device():
  assert bench.default_bandwidth_gbs("gpu", "NVIDIA H100 80GB HBM3") == 3350.0
  assert bench.default_bandwidth_gbs("gpu", "NVIDIA H100 PCIe") == 2000.0
  assert bench.default_bandwidth_gbs("tpu", "TPU v5 lite") == 819.0
  assert bench.default_bandwidth_gbs("gpu", "Some Future GPU") == 1000.0
  assert bench.default_bandwidth_gbs("cpu", "cpu") > 0


def test_peak_flops_measured_bandwidth_and_kernel_rows():
  assert bench.peak_tflops("gpu", "NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert bench.peak_tflops("gpu", "NVIDIA H100 80GB HBM3", "float32") == 495.0
  assert bench.peak_tflops("cpu", "cpu", "float32") is None
  assert bench.peak_tflops("gpu", "Some Future GPU", "bfloat16") is None
  # A copy of 8 MB takes a positive, finite time: a bandwidth in a plausible range (GB/s).
  assert 0.1 < bench.measure_bandwidth_gbs(8) < 1e5
  # On CPU the Pallas kernels would run in interpret mode: not timed.
  assert bench.kernel_impls(["reference", "xla", "pallas"]) == ["reference", "xla"]
  from ssm.benchmarks import fla_reference
  assert not fla_reference.available()  # no torch/fla/CUDA in the test environment
  rows = [{"ms": 2.0}, {"ms": 4.0}]
  bench.add_ratio_to(rows, rows[1], "vs_fla")
  assert [r["vs_fla"] for r in rows] == [2.0, 1.0]


def test_programs_over_the_memory_budget_are_left_out(tmp_path, capsys):
  # XLA's estimate for y = 2 x on 1000 float32: 4000 bytes in, 4000 out, few temporaries.
  x = jax.numpy.ones(1000, jax.numpy.float32)
  needed = bench.memory_needed(jax.jit(lambda x: 2 * x).lower(x).compile())
  assert 8000 <= needed < 100_000
  assert bench.default_memory_budget_bytes() > 1e8
  with pytest.raises(bench.OverMemoryBudget, match="needs"):
    bench.time_fn(lambda x: 2 * x, x, repeats=1, max_bytes=needed - 1)
  assert len(bench.time_fn(lambda x: 2 * x, x, repeats=2, max_bytes=needed)[0]) == 2
  # Under a budget nothing meets, every implementation is left out and named on stderr.
  out = tmp_path / "bench.json"
  assert bench.main(TINY + ["--lengths", "8", "--max-memory-gb", "1e-9", "--json", str(out)]) == 0
  assert json.loads(out.read_text())["rows"] == []
  err = capsys.readouterr().err
  for impl in scan.IMPLEMENTATIONS:
    assert f"scan {impl} 2x8x3 (fwd): skipped, needs" in err, impl
  with pytest.raises(SystemExit):
    bench.main(TINY + ["--max-memory-gb", "0"])


def test_unknown_op_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as info:
    bench.main(["--ops", "nosuchop"])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "nosuchop" in err and "scan" in err


def test_register_rejects_duplicates():
  bench.load_cases()
  with pytest.raises(ValueError, match="scan"):
    bench.register("scan", "again")(lambda args: [])


def test_s4_family_ops(tmp_path):
  out = tmp_path / "bench.json"
  argv = ["--ops", "s4_kernels,s4_layers", "--lengths", "16", "--batch", "1", "--features", "4",
          "--s4-state", "4", "--repeats", "1", "--warmup", "1", "--json", str(out)]
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  assert {(r["op"], r["impl"]) for r in rows} == {
      ("s4_kernels", "s4_dplr"), ("s4_kernels", "s4d_vandermonde"),
      ("s4_layers", "s4d"), ("s4_layers", "s4"), ("s4_layers", "s5")}
  for r in rows:
    assert r["ms"] > 0
    reference = "s4_dplr" if r["op"] == "s4_kernels" else "s4d"
    if r["impl"] == reference:
      assert r["speedup"] == 1.0


@pytest.mark.parametrize("grad", [False, True])
def test_mamba_ops(tmp_path, grad):
  out = tmp_path / "bench.json"
  argv = ["--ops", "selective_scan,ssd", "--lengths", "10", "--batch", "1", "--features", "8",
          "--mamba-state", "2", "--ssd-head-dim", "4", "--repeats", "1", "--warmup", "1",
          "--json", str(out)] + (["--grad"] if grad else [])
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  assert {(r["op"], r["impl"]) for r in rows} == {
      (op, impl) for op in ("selective_scan", "ssd") for impl in ("reference", "xla")}
  for r in rows:
    assert r["ms"] > 0 and r["mode"] == ("fwd+bwd" if grad else "fwd")
    assert r["speedup"] == 1.0 if r["impl"] == "reference" else r["speedup"] > 0
