"""Where training metrics go: stdout, a JSONL file, TensorBoard, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping

JSONL_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


class MetricWriter:
  """Appends one JSON object per record to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.workdir / JSONL_NAME, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
    record = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_metrics(split: str, step: int, metrics: Mapping[str, float]) -> str:
  parts = [f"{k}={v:.4g}" for k, v in metrics.items()]
  return f"[{split} step {step}] " + " ".join(parts)


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str | pathlib.Path, *, majority_rate: float | None = None) -> pathlib.Path:
  """Draws train/eval loss and accuracy from `metrics.jsonl` into `curves.png`; returns its path.

  When a run was resumed the file holds repeated steps; the last record of each (split, step) wins.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  workdir = pathlib.Path(workdir)
  latest: dict[tuple[str, int], dict] = {}
  for r in read_jsonl(workdir / JSONL_NAME):
    latest[(r["split"], r["step"])] = r
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split in sorted({s for s, _ in latest}):
    rows = sorted((r for (s, _), r in latest.items() if s == split), key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
      values = [r.get(key, math.nan) for r in rows]
      if any(not math.isnan(v) for v in values):
        ax.plot(steps, values, marker="o" if split != "train" else None, label=split)
  if majority_rate is not None:
    ax_acc.axhline(majority_rate, color="gray", linestyle="--", label="majority class")
  for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = workdir / PLOT_NAME
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def position_means(per_position, buckets: int = 128):
  """Loss-by-position curves are noisy per position: the means over `buckets` equal spans of
  positions, as (span centres, means), two float64 [min(buckets, len)] arrays (NaNs ignored)."""
  import numpy as np
  values = np.asarray(per_position, dtype=np.float64)
  spans = np.array_split(np.arange(values.size), min(buckets, values.size))
  return (np.array([s.mean() for s in spans]),
          np.array([np.nanmean(values[s]) if np.isfinite(values[s]).any() else np.nan
                    for s in spans]))


def plot_extrapolation(record: Mapping, path: str | pathlib.Path) -> None:
  """Draws the loss by position of each evaluated length (`Trainer.extrapolation`'s record:
  {"train_length", "unit", "lengths": {length: {"per_position": [...]}}}), as `position_means`,
  with the training length marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for length, result in sorted(record["lengths"].items(), key=lambda kv: int(kv[0])):
    ax.plot(*position_means(result["per_position"]), label=f"length {length}")
  ax.axvline(record["train_length"], color="gray", linestyle="--", label="training length")
  ax.set_xlabel("position")
  ax.set_ylabel("loss (nats per token)")
  ax.set_xlim(left=0)
  ax.set_title("loss by position (means over spans of positions)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
