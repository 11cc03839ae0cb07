"""`python -m ssm report RUN_DIR [RUN_DIR ...] [--out DIR] [--skip-bad]`: compare finished runs.

Reads what `python -m ssm train` leaves in each run directory (config.json, metrics.jsonl,
result.json when the run finished, extrapolation.json for some LM runs) and writes into --out
(default ./report):

  report.md                one row per run (sorted by task, then test accuracy, best first)
  report.csv               the same table, unrounded
  curves.png               train loss and validation accuracy against step, one line per run
  accuracy_by_mixer.png    test accuracy of finished runs: a panel per task, a bar per mixer pattern
  extrapolation.png        loss per position at each evaluated length (only when a run has it)

A directory that is missing or has no readable config.json is an error (exit 2) unless --skip-bad is
given, in which case it is listed as skipped in report.md and on stderr.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import sys

from ssm import metrics

# Eval metrics that get table columns when any run has them (LM runs: bits per byte / base / token).
EXTRA_METRICS = ("bits_per_byte", "bits_per_base", "bits_per_token")


class RunError(ValueError):
  """A run directory cannot be reported on; the message names it."""


@dataclasses.dataclass
class Run:
  """What one run directory holds. `records` keeps the last record of each (split, step)."""

  name: str
  path: pathlib.Path
  config: dict
  records: list[dict]
  result: dict | None = None
  extrapolation: dict | None = None

  def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of a numeric metric of one split, in step order."""
    rows = [r for r in self.records if r.get("split") == split and _number(r.get(key)) is not None]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def _number(value) -> float | None:
  """`value` as a float when it is a real number (bools excluded), else None."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return None


def _warn(message: str) -> None:
  print(f"report: {message}", file=sys.stderr)


def _read_json(path: pathlib.Path) -> dict | None:
  """The JSON object in `path`, or None (with a warning) when it is absent or unreadable."""
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    _warn(f"ignoring {path}: {e}")
    return None
  if not isinstance(data, dict):
    _warn(f"ignoring {path}: not a JSON object")
    return None
  return data


def read_records(path: pathlib.Path) -> list[dict]:
  """Records of a metrics.jsonl in step order; a resumed run's repeated (split, step) keep the last.

  Unparseable lines (e.g. a line cut off when the run was killed) are skipped with a warning.
  """
  if not path.is_file():
    return []
  latest: dict[tuple[str, int], dict] = {}
  bad = 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      latest[(str(record["split"]), int(record["step"]))] = record
    except (ValueError, KeyError, TypeError):
      bad += 1
  if bad:
    _warn(f"{path}: skipped {bad} unreadable line(s)")
  return sorted(latest.values(), key=lambda r: r["step"])


def load_run(path: str | pathlib.Path) -> Run:
  """Reads a run directory; raises RunError when it is missing or has no readable config.json."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise RunError(f"run directory {str(path)!r} does not exist")
  config = _read_json(path / "config.json")
  if config is None:
    raise RunError(f"run directory {str(path)!r} has no readable config.json")
  name = path.resolve().name
  return Run(name, path, config, read_records(path / "metrics.jsonl"),
             _read_json(path / "result.json"), _read_json(path / "extrapolation.json"))


def summarize(run: Run) -> dict:
  """One table row: settings from the config, final and best metrics, status."""
  model, data, optim = (run.config.get(k) or {} for k in ("model", "data", "optim"))
  steps = [r["step"] for r in run.records]
  result = run.result
  if result is not None:
    done, status = result.get("step", max(steps, default=None)), "finished"
  elif steps:
    done = max(steps)
    status = f"unfinished at step {done}"
  else:
    done, status = None, "no metrics"
  row = {"run": run.name, "task": data.get("name", run.config.get("name")),
         "pattern": model.get("pattern"), "d_model": model.get("d_model"),
         "layers": model.get("n_layers"), "lr": optim.get("lr"), "steps": done}
  for split, prefix in (("validation", "val"), ("test", "test")):
    final = (result or {}).get(split)
    if not isinstance(final, dict):  # unfinished: the newest evaluation, if any
      final = next((r for r in reversed(run.records) if r.get("split") == split), {})
    for key in ("loss", "accuracy") + EXTRA_METRICS:
      row[f"{prefix}_{key}"] = _number(final.get(key))
  val_steps, val_acc = run.series("validation", "accuracy")
  best = max(range(len(val_acc)), key=lambda i: (val_acc[i], -val_steps[i]), default=None)
  row["best_val_accuracy"] = None if best is None else val_acc[best]
  row["best_val_step"] = None if best is None else val_steps[best]
  row["status"] = status
  return row


def sort_rows(rows: list[dict]) -> list[dict]:
  """By task, then test accuracy (best first, missing last), then run name."""
  def key(row):
    acc = row["test_accuracy"]
    missing = acc is None or math.isnan(acc)
    return (str(row["task"]), missing, 0.0 if missing else -acc, row["run"])
  return sorted(rows, key=key)


def columns(rows: list[dict]) -> list[str]:
  """Row keys in table order; EXTRA_METRICS columns only when some run has them."""
  keys = list(rows[0]) if rows else []
  return [k for k in keys
          if not any(k.endswith(m) for m in EXTRA_METRICS) or any(r[k] is not None for r in rows)]


def _cell(key: str, value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if key == "lr":
    return f"{value:g}"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value).replace("|", "\\|")


def markdown(rows: list[dict], skipped: list[str], plots: list[str]) -> str:
  """report.md: the table, the skipped directories, and the plots."""
  keys = columns(rows)
  lines = [f"# Training report ({len(rows)} run{'s' * (len(rows) != 1)})", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_cell(k, r[k]) for k in keys) + " |" for r in rows]
  if skipped:
    lines += ["", "## Skipped", ""] + [f"- {reason}" for reason in skipped]
  if plots:
    lines += ["", "## Plots", ""] + [f"![{pathlib.Path(p).stem}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  keys = columns(rows)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(keys)
    writer.writerows([["" if r[k] is None else r[k] for k in keys] for r in rows])


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(plt, fig, path: pathlib.Path) -> pathlib.Path:
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_curves(runs: list[Run], path: pathlib.Path) -> pathlib.Path:
  """Train loss and validation accuracy against step; one colour per run, one legend."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  handles = {}
  for i, run in enumerate(runs):
    for ax, split, key in ((axes[0], "train", "loss"), (axes[1], "validation", "accuracy")):
      steps, values = run.series(split, key)
      if steps:
        marker = None if split == "train" else "o"
        (line,) = ax.plot(steps, values, color=f"C{i % 10}", marker=marker, markersize=3,
                          label=run.name)
        handles.setdefault(run.name, line)
  for ax, title in zip(axes, ("train loss", "validation accuracy")):
    ax.set(xlabel="step", title=title)
    ax.grid(alpha=0.3)
    if not ax.lines:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  if handles:
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize="small")
  fig.tight_layout()
  return _save(plt, fig, path)


def plot_accuracy_by_mixer(rows: list[dict], majority: dict[str, float],
                           path: pathlib.Path) -> pathlib.Path | None:
  """Test accuracy of finished runs: a panel per task, a bar per pattern (mean over its runs).

  `majority` maps a task to its majority-class rate, drawn dashed. None when nothing to plot.
  """
  groups: dict[str, dict[str, list[float]]] = {}
  for r in rows:
    if r["status"] == "finished" and r["test_accuracy"] is not None:
      by_pattern = groups.setdefault(str(r["task"]), {})
      by_pattern.setdefault(str(r["pattern"]), []).append(r["test_accuracy"])
  if not groups:
    return None
  plt = _pyplot()
  tasks = sorted(groups)
  widths = [len(groups[t]) for t in tasks]
  fig, axes = plt.subplots(1, len(tasks), figsize=(1.5 + 1.2 * sum(widths), 4), sharey=True,
                           squeeze=False, gridspec_kw={"width_ratios": widths})
  for ax, task in zip(axes[0], tasks):
    patterns = sorted(groups[task])
    counts = [len(groups[task][p]) for p in patterns]
    labels = [p if n == 1 else f"{p}\n(n={n})" for p, n in zip(patterns, counts)]
    means = [sum(groups[task][p]) / n for p, n in zip(patterns, counts)]
    bars = ax.bar(labels, means, color=[f"C{i % 10}" for i in range(len(patterns))])
    ax.bar_label(bars, fmt="%.3f", fontsize="small")
    if majority.get(task) is not None:
      ax.axhline(majority[task], color="gray", linestyle="--", label="majority class")
      ax.legend(fontsize="small")
    ax.set_title(task)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("test accuracy")
  fig.tight_layout()
  return _save(plt, fig, path)


def _extrapolation_curves(data: dict) -> tuple[float | None, list[tuple[str, list[float]]]]:
  """(train length, [(length, per-position losses)]) from an extrapolation.json, tolerantly."""
  lengths = data.get("lengths")
  curves = []
  if isinstance(lengths, dict):
    for label, entry in lengths.items():
      values = entry.get("per_position") if isinstance(entry, dict) else None
      if isinstance(values, list):
        values = [v if _number(v) is not None else math.nan for v in values]
        if values:
          curves.append((str(label), values))
  curves.sort(key=lambda c: (len(c[1]), c[0]))
  return _number(data.get("train_length")), curves


def plot_extrapolation(runs: list[Run], path: pathlib.Path) -> pathlib.Path | None:
  """Loss per position for each evaluated length, a panel per run; None when no run has the data."""
  panels = [(r.name, *_extrapolation_curves(r.extrapolation)) for r in runs if r.extrapolation]
  panels = [p for p in panels if p[2]]
  if not panels:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.5 * len(panels)), squeeze=False)
  for ax, (name, train_length, curves) in zip(axes[:, 0], panels):
    for label, values in curves:
      ax.plot(*metrics.position_means(values), linewidth=1.0, label=f"length {label}")
    if train_length is not None:
      ax.axvline(train_length, color="gray", linestyle="--", label=f"train length {train_length:g}")
    ax.set(xlabel="position", ylabel="loss (means over spans of positions)", title=name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  return _save(plt, fig, path)


def main(argv: list[str]) -> int:
  """The `report` command; returns the exit status (2: a bad run directory or none usable)."""
  parser = argparse.ArgumentParser(prog="python -m ssm report", description=__doc__.split("\n")[0])
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", default="report", help="output directory (default ./report)")
  parser.add_argument("--skip-bad", action="store_true",
                      help="report unusable run directories as skipped instead of failing")
  args = parser.parse_args(argv)
  runs, skipped = [], []
  for d in args.run_dirs:
    try:
      runs.append(load_run(d))
    except RunError as e:
      if not args.skip_bad:
        print(f"error: {e} (pass --skip-bad to skip it)", file=sys.stderr)
        return 2
      _warn(f"skipped: {e}")
      skipped.append(str(e))
  if not runs:
    print("error: no usable run directories", file=sys.stderr)
    return 2
  names = [r.name for r in runs]
  for run in runs:  # two directories with the same name: tell them apart by the path given
    if names.count(run.name) > 1:
      run.name = str(run.path)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  summaries = [summarize(r) for r in runs]
  majority = {}
  for run, row in zip(runs, summaries):
    rate = _number((run.result or {}).get("majority_rate"))
    if rate is not None:
      majority.setdefault(str(row["task"]), rate)
  rows = sort_rows(summaries)
  plots = [plot_curves(runs, out / "curves.png"),
           plot_accuracy_by_mixer(rows, majority, out / "accuracy_by_mixer.png"),
           plot_extrapolation(runs, out / "extrapolation.png")]
  plots = [p.name for p in plots if p is not None]
  (out / "report.md").write_text(markdown(rows, skipped, plots))
  write_csv(rows, out / "report.csv")
  print(f"{len(rows)} run(s) -> {out / 'report.md'} (+ report.csv, {', '.join(plots)})")
  return 0
