"""ssm.report: the table, the plots and the errors, from fake run directories with known metrics."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest
from PIL import Image

from ssm import report


def make_run(root: pathlib.Path, name: str, *, task: str = "lra_listops", pattern: str = "s4d",
             lr: float = 1e-3, val_acc=(0.2, 0.5, 0.4), test_acc: float | None = 0.45,
             finished: bool = True, lm: bool = False, extrapolation: bool = False,
             metrics: bool = True, config: bool = True) -> pathlib.Path:
  """A run directory as `python -m ssm train` leaves it: train records every 10 steps, an
  evaluation every 100 (accuracies `val_acc`), a test record and result.json when `finished`."""
  run = root / name
  run.mkdir(parents=True)
  if config:
    (run / "config.json").write_text(json.dumps({
        "name": name, "seed": 0,
        "model": {"task": "lm" if lm else "classify", "pattern": pattern, "d_model": 64,
                  "n_layers": 4, "mixers": {}},
        "data": {"name": task, "seq_len": 128}, "optim": {"lr": lr},
        "train": {"num_steps": 100 * len(val_acc)}}))
  last = 100 * len(val_acc)
  records = [{"split": "train", "step": s, "loss": 3.0 - s / 1000, "accuracy": s / 1000}
             for s in range(10, last + 1, 10)]
  for i, acc in enumerate(val_acc):
    ev = {"split": "validation", "step": 100 * (i + 1), "loss": 2.0 - acc, "accuracy": acc}
    records.append({**ev, "bits_per_byte": 1.5 - acc} if lm else ev)
  final = {"validation": {k: v for k, v in records[-1].items() if k not in ("split", "step")}}
  if finished:
    final["test"] = {"loss": 2.0 - test_acc, "accuracy": test_acc, "examples": 100.0}
    if lm:
      final["test"]["bits_per_byte"] = 1.5 - test_acc
    records.append({"split": "test", "step": last, **final["test"]})
    (run / "result.json").write_text(json.dumps({"step": last, **final, "majority_rate": 0.1}))
  if metrics:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if extrapolation:
    (run / "extrapolation.json").write_text(json.dumps({"train_length": 8, "lengths": {
        "8": {"loss": 1.0, "per_position": [1.0] * 8},
        "32": {"loss": 1.2, "per_position": [1.0] * 8 + [1.5] * 24},
        "bad": "not an entry"}}))
  return run


def read_table(path: pathlib.Path) -> list[dict[str, str]]:
  """The rows of report.md's table as {column: cell}."""
  lines = [l for l in path.read_text().splitlines() if l.startswith("|")]
  cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
  return [dict(zip(cells[0], row)) for row in cells[2:]]


def assert_png(path: pathlib.Path) -> None:
  with Image.open(path) as image:
    assert image.format == "PNG" and min(image.size) > 100
    image.verify()


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
  """One report over five runs of two tasks: (output dir, {run name: table row}, row order)."""
  root = tmp_path_factory.mktemp("runs")
  dirs = [make_run(root, "lo_s4d", test_acc=0.45, extrapolation=True),
          make_run(root, "lo_attn", pattern="s4d,attn", lr=4e-3, test_acc=0.6),
          make_run(root, "lo_partial", val_acc=(0.3, 0.35), finished=False),
          make_run(root, "lm_hybrid", task="lm_text", lm=True, test_acc=0.3),
          make_run(root, "lo_empty", finished=False, metrics=False)]
  out = root / "out"
  assert report.main([str(d) for d in dirs] + ["--out", str(out)]) == 0
  rows = read_table(out / "report.md")
  return out, {r["run"]: r for r in rows}, [r["run"] for r in rows]


def test_table_values(reported):
  _, rows, _ = reported
  row = rows["lo_attn"]
  assert (row["task"], row["pattern"], row["d_model"], row["layers"], row["lr"]) == (
      "lra_listops", "s4d,attn", "64", "4", "0.004")
  assert row["steps"] == "300" and row["status"] == "finished"
  assert float(row["val_accuracy"]) == pytest.approx(0.4)  # final, not best
  assert float(row["val_loss"]) == pytest.approx(1.6)
  assert float(row["test_accuracy"]) == pytest.approx(0.6)
  assert float(row["test_loss"]) == pytest.approx(1.4)
  assert (float(row["best_val_accuracy"]), row["best_val_step"]) == (pytest.approx(0.5), "200")
  # bits_per_byte columns exist (an LM run has them) and are blank for classifiers.
  assert float(rows["lm_hybrid"]["test_bits_per_byte"]) == pytest.approx(1.2)
  assert float(rows["lm_hybrid"]["val_bits_per_byte"]) == pytest.approx(1.1)
  assert row["test_bits_per_byte"] == "-"


def test_unfinished_and_empty_status(reported):
  _, rows, _ = reported
  partial = rows["lo_partial"]
  assert partial["status"] == "unfinished at step 200" and partial["steps"] == "200"
  assert float(partial["val_accuracy"]) == pytest.approx(0.35)  # the newest evaluation
  assert partial["test_accuracy"] == "-" and partial["test_loss"] == "-"
  empty = rows["lo_empty"]
  assert empty["status"] == "no metrics"
  assert empty["steps"] == empty["val_accuracy"] == empty["best_val_step"] == "-"


def test_sorted_by_task_then_test_accuracy(reported):
  _, _, order = reported
  assert order == ["lm_hybrid", "lo_attn", "lo_s4d", "lo_empty", "lo_partial"]


def test_csv_matches_table(reported):
  out, rows, order = reported
  with open(out / "report.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert [r["run"] for r in table] == order
  assert float(table[1]["test_accuracy"]) == 0.6 and table[1]["status"] == "finished"
  assert table[-1]["test_accuracy"] == ""


def test_plots_are_pngs(reported):
  out, _, _ = reported
  for name in ("curves.png", "accuracy_by_mixer.png", "extrapolation.png"):
    assert_png(out / name)
  assert "![curves](curves.png)" in (out / "report.md").read_text()


def test_resumed_and_truncated_metrics(tmp_path, capsys):
  """A resumed run repeats steps (the last record wins); a killed run may leave half a line."""
  run = make_run(tmp_path, "r", val_acc=(0.2, 0.3), finished=False)
  with open(run / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"split": "validation", "step": 200, "loss": 1.0, "accuracy": 0.9}) + "\n")
    f.write('{"split": "train", "st')
  row = report.summarize(report.load_run(run))
  assert row["val_accuracy"] == row["best_val_accuracy"] == 0.9 and row["best_val_step"] == 200
  assert "skipped 1 unreadable line" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing", "no_config"])
def test_bad_run_dir(tmp_path, capsys, bad):
  good = make_run(tmp_path, "good")
  bad_dir = tmp_path / bad
  if bad == "no_config":
    make_run(tmp_path, bad, config=False)
  out = tmp_path / "out"
  assert report.main([str(good), str(bad_dir), "--out", str(out)]) == 2
  assert str(bad_dir) in capsys.readouterr().err
  assert not out.exists()

  assert report.main([str(good), str(bad_dir), "--out", str(out), "--skip-bad"]) == 0
  assert str(bad_dir) in capsys.readouterr().err
  text = (out / "report.md").read_text()
  assert "## Skipped" in text and str(bad_dir) in text
  assert [r["run"] for r in read_table(out / "report.md")] == ["good"]
  assert not (out / "extrapolation.png").exists()


def test_only_bad_dirs_and_default_out(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert report.main(["nowhere", "--skip-bad"]) == 2
  make_run(tmp_path, "unfinished", finished=False)
  assert report.main(["unfinished"]) == 0
  assert (tmp_path / "report" / "report.md").is_file()
  assert_png(tmp_path / "report" / "curves.png")
  assert not (tmp_path / "report" / "accuracy_by_mixer.png").exists()  # no finished run
