"""Task `npz_classification`: classify sequences or images from your own numpy arrays.

Files (settings under `config.data`)
  train_file  required  the training examples
  test_file   required  the test examples
  val_file    None      the validation examples; None: a fraction `val_fraction` (0.1) of the
                        train file, chosen by a fixed permutation (numpy default_rng(VAL_SEED=0)
                        .permutation(N)[:round(val_fraction * N)]); the rest stay train. Both
                        keep file order.
Each file is either
  * a `.npz` (`np.savez` / `np.savez_compressed`) holding the arrays
      x_key        ("x")        inputs [N, ...], see below
      y_key        ("y")        integer class labels >= 0, [N] (or [N, 1])
      lengths_key  ("lengths")  optional: the real length (1..L) of each padded sequence, [N];
                                used when the file holds it (None: never)
    e.g. `np.savez("train.npz", x=x, y=y)`;
  * or a `.npy` of the inputs alone, named `<x_key>.npy` or `<prefix>_<x_key>.npy`: its labels
    are the sibling file with y_key in place of x_key, its lengths (optional) the sibling with
    lengths_key: train_x.npy -> train_y.npy, train_lengths.npy; x.npy -> y.npy, lengths.npy.
    This is an unpacked .npz (np.savez stores key k as k.npy). .npy files are memory-mapped,
    so the inputs need not fit in memory; they are read example by example.

Inputs: the dtype and the number of axes say what x is (every split must agree):
  integer [N, L]         token ids >= 0: tokens = x + 1 (0 stays padding), vocab_size =
                         (largest id over all splits) + 2
  float   [N, L]         one feature per step: tokens float32 [L, 1]
  float   [N, L, d]      d features per step: tokens float32 [L, d]
  integer [N, H, W]      grayscale images 0..255: tokens float32 [H * W, 1] = pixels / 255,
                         row by row
  any     [N, H, W, C]   images: tokens float32 [H * W, C] (integers 0..255 divided by 255,
                         floats as they are)
  A float [N, H, W] array is read as sequences [N, L, d]: give float grayscale images a channel
  axis ([N, H, W, 1]). With lengths (sequences only), example i keeps its first lengths[i] steps;
  the padding after them is not read, so it may hold anything.

Labels: num_classes (0: largest label over all splits + 1); labels are < num_classes.
Examples: {"tokens": int32 [n] or float32 [n, d], "label": int}. Prepared: kind "classify",
vocab_size (0 for features), d_input (0 for token ids), max_num_tokens and label_counts per split.

Errors are ConfigErrors naming the file setting (e.g. "data.train_file") and, in the message,
the file and array: a missing file or array, x and y (or lengths) with different N, labels that
are not integers or are negative, negative token ids or pixel values outside 0..255, non-finite
floats (naming the first such example), lengths outside 1..L, splits of different kinds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ssm.config import ConfigError
from ssm.data.prepared import (ArraySource, MappedSource, Prepared, SubsetSource, TaskSpec,
                               setting_float, setting_int, setting_path)

VAL_SEED = 0
FIELDS = {"train_file": None, "test_file": None, "val_file": None, "val_fraction": 0.1,
          "x_key": "x", "y_key": "y", "lengths_key": "lengths", "num_classes": 0}
_CHUNK_BYTES = 1 << 26  # inputs are checked this many bytes at a time


@dataclasses.dataclass
class _Arrays:
  """One file's arrays; `where` names them in messages ("train.npz['x']", "train_x.npy")."""

  field: str  # "data.train_file"
  x: np.ndarray
  y: np.ndarray  # int64 [N]
  lengths: np.ndarray | None  # int64 [N]
  where: dict[str, str]
  mode: str = ""  # "tokens" or "features"
  d: int = 0  # features per step
  scale: float | None = None  # 1/255 for integer images
  steps: int = 0  # L (or H * W)


def _load_npy(field: str, path: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise ConfigError(field, f"{path}: not a readable .npy file ({e})") from None


def _read(field: str, path: str, x_key: str, y_key: str, lengths_key: str | None) -> _Arrays:
  """The arrays of one file (see the module doc), with x's layout not yet checked."""
  if not os.path.isfile(path):
    raise ConfigError(field, f"no such file: {path}")
  if path.endswith(".npz"):
    where = {"x": f"{path}[{x_key!r}]", "y": f"{path}[{y_key!r}]",
             "lengths": f"{path}[{lengths_key!r}]"}
    keys = {"x": x_key, "y": y_key, "lengths": lengths_key}
    try:
      with np.load(path) as npz:
        names = list(npz.files)
        arrays = {what: npz[key] for what, key in keys.items() if key in names}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ConfigError(field, f"{path}: not a readable .npz file ({e})") from None
    for what in ("x", "y"):
      if what not in arrays:
        raise ConfigError(field, f"{path} has no array {keys[what]!r} (data.{what}_key); it "
                          f"holds {', '.join(map(repr, names)) or 'nothing'}")
  elif path.endswith(".npy"):
    folder, name = os.path.split(path)
    if not (name == f"{x_key}.npy" or name.endswith(f"_{x_key}.npy")):
      raise ConfigError(field, f"{path}: a .npy input file must be named {x_key}.npy or "
                        f"<prefix>_{x_key}.npy (data.x_key), so that its labels file can be found")
    prefix = name[:-len(f"{x_key}.npy")]
    where = {"x": path, "y": os.path.join(folder, f"{prefix}{y_key}.npy"),
             "lengths": os.path.join(folder, f"{prefix}{lengths_key}.npy")}
    if not os.path.isfile(where["y"]):
      raise ConfigError(field, f"{path}: its labels file {where['y']} (data.y_key) does not exist")
    arrays = {"x": _load_npy(field, path), "y": _load_npy(field, where["y"])}
    if lengths_key is not None and os.path.isfile(where["lengths"]):
      arrays["lengths"] = _load_npy(field, where["lengths"])
  else:
    raise ConfigError(field, f"{path}: expected a .npz or .npy file")
  x = arrays["x"]
  if x.ndim < 2 or x.ndim > 4 or x.dtype.kind not in "iuf":
    raise ConfigError(field, f"{where['x']}: inputs must be integers or floats with 2 to 4 axes "
                      f"[N, ...], got {x.dtype} {list(x.shape)}")
  n = x.shape[0]
  if n == 0:
    raise ConfigError(field, f"{where['x']} holds no examples")
  y = _labels(field, where, arrays["y"], n)
  lengths = arrays.get("lengths")
  if lengths is not None:
    lengths = _lengths(field, where, lengths, x)
  return _Arrays(field=field, x=x, y=y, lengths=lengths, where=where)


def _first(bad: np.ndarray) -> int:
  return int(np.flatnonzero(bad)[0])


def _labels(field: str, where: Mapping[str, str], y: np.ndarray, n: int) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise ConfigError(field, f"{where['y']}: labels must be [N] or [N, 1], got {list(y.shape)}")
  if y.shape[0] != n:
    raise ConfigError(field, f"{where['y']} has {y.shape[0]} labels but {where['x']} has {n} "
                      f"examples")
  if y.dtype.kind == "f":
    bad = ~np.isfinite(y)
    bad[~bad] = y[~bad] != np.round(y[~bad])
    if bad.any():
      i = _first(bad)
      raise ConfigError(field, f"{where['y']}: the label of example {i} is {y[i]}, not an integer")
  elif y.dtype.kind not in "iu":
    raise ConfigError(field, f"{where['y']}: labels must be integers, got dtype {y.dtype}")
  if (y < 0).any():
    i = _first(y < 0)
    raise ConfigError(field, f"{where['y']}: the label of example {i} is {y[i]}, negative")
  return y.astype(np.int64)


def _lengths(field: str, where: Mapping[str, str], lengths: np.ndarray,
             x: np.ndarray) -> np.ndarray:
  lengths = np.asarray(lengths)
  n, steps = x.shape[0], x.shape[1]
  if (x.dtype.kind in "iu" and x.ndim > 2) or x.ndim == 4:
    raise ConfigError(field, f"{where['lengths']}: lengths are for padded sequences [N, L] or "
                      f"[N, L, d], but {where['x']} holds images {list(x.shape)}")
  if lengths.ndim != 1 or lengths.shape[0] != n:
    raise ConfigError(field, f"{where['lengths']} has shape {list(lengths.shape)} but "
                      f"{where['x']} has {n} examples (expected [{n}])")
  if lengths.dtype.kind not in "iu":
    raise ConfigError(field, f"{where['lengths']}: lengths must be integers, got dtype "
                      f"{lengths.dtype}")
  bad = (lengths < 1) | (lengths > steps)
  if bad.any():
    i = _first(bad)
    raise ConfigError(field, f"{where['lengths']}: the length of example {i} is {lengths[i]}, not "
                      f"in 1..{steps} (the sequence length of {where['x']})")
  return lengths.astype(np.int64)


def _layout(a: _Arrays) -> None:
  """Sets a.mode, a.d, a.scale, a.steps from x's dtype and shape (see the module doc)."""
  x = a.x
  is_int = x.dtype.kind in "iu"
  if is_int and x.ndim == 2:
    a.mode, a.d, a.steps = "tokens", 0, x.shape[1]
    return
  a.mode = "features"
  if x.ndim == 4:
    a.d, a.steps = x.shape[3], x.shape[1] * x.shape[2]
  elif is_int:  # [N, H, W] grayscale image
    a.d, a.steps = 1, x.shape[1] * x.shape[2]
  else:  # float [N, L] or [N, L, d]
    a.d, a.steps = (1 if x.ndim == 2 else x.shape[2]), x.shape[1]
  a.scale = 1 / 255 if is_int else None


def _describe(a: _Arrays) -> str:
  if a.mode == "tokens":
    return "token ids"
  return f"{a.d} feature{'s' if a.d != 1 else ''} per step"


def _check(a: _Arrays) -> int:
  """Checks x's values chunk by chunk (only the first lengths[i] steps of example i); returns
  the largest token id (-1 for features)."""
  x, where, largest = a.x, a.where["x"], -1
  rows = max(1, _CHUNK_BYTES // max(1, x[:1].nbytes))
  for start in range(0, x.shape[0], rows):
    chunk = np.asarray(x[start:start + rows])
    real = np.ones(chunk.shape, dtype=bool)
    if a.lengths is not None:
      inside = np.arange(chunk.shape[1]) < a.lengths[start:start + rows, None]
      real = np.broadcast_to(inside.reshape(inside.shape + (1,) * (chunk.ndim - 2)), chunk.shape)
    per_example = (len(chunk), -1)
    if a.mode == "tokens":
      bad = ((chunk < 0) & real).reshape(per_example).any(axis=1)
      if bad.any():
        i = _first(bad)
        raise ConfigError(a.field, f"{where}: example {start + i} holds the token id "
                          f"{chunk[i][(chunk[i] < 0) & real[i]][0]}; ids must be >= 0")
      largest = max(largest, int(np.where(real, chunk, 0).max()))
    elif a.scale is not None:
      bad = (((chunk < 0) | (chunk > 255)) & real).reshape(per_example).any(axis=1)
      if bad.any():
        raise ConfigError(a.field, f"{where}: example {start + _first(bad)} has a pixel value "
                          f"outside 0..255")
    else:
      bad = (~np.isfinite(chunk) & real).reshape(per_example).any(axis=1)
      if bad.any():
        raise ConfigError(a.field, f"{where}: example {start + _first(bad)} has a non-finite value "
                          f"(nan or inf)")
  return largest


def _example(example: Mapping[str, Any], *, mode: str, d: int,
             scale: float | None) -> dict[str, Any]:
  x = np.asarray(example["x"])
  if mode == "tokens":
    tokens = x.astype(np.int32) + 1
  else:
    tokens = x.reshape(-1, d).astype(np.float32)
    if scale is not None:
      tokens *= np.float32(scale)
  if "length" in example:
    tokens = tokens[:int(example["length"])]
  return {"tokens": tokens, "label": int(example["label"])}


def _source(a: _Arrays) -> MappedSource:
  arrays = {"x": a.x, "label": a.y}
  if a.lengths is not None:
    arrays["length"] = a.lengths
  return MappedSource(ArraySource(arrays),
                      functools.partial(_example, mode=a.mode, d=a.d, scale=a.scale))


def _key(settings: Mapping[str, Any], name: str, optional: bool = False) -> str | None:
  value = settings[name]
  if value is None and optional:
    return None
  if not isinstance(value, str) or not value:
    raise ConfigError(f"data.{name}", f"must be a non-empty string{' or None' if optional else ''}"
                      f", got {value!r}")
  return value


def load(settings: Mapping[str, Any], *, data_dir: str | None = None,
         manual_dir: str | None = None) -> Prepared:
  """Reads and checks the files (see the module doc); nothing is written."""
  del data_dir, manual_dir  # the files are named by the settings
  keys = (_key(settings, "x_key"), _key(settings, "y_key"),
          _key(settings, "lengths_key", optional=True))
  paths = {"train": setting_path(settings, "train_file", required=True),
           "validation": setting_path(settings, "val_file"),
           "test": setting_path(settings, "test_file", required=True)}
  val_fraction = setting_float(settings, "val_fraction", 0.0, 1.0)
  num_classes = setting_int(settings, "num_classes", low=0)
  fields = {"train": "data.train_file", "validation": "data.val_file", "test": "data.test_file"}
  files = {split: _read(fields[split], path, *keys) for split, path in paths.items()
           if path is not None}

  train = files["train"]
  largest = -1
  for split, a in files.items():
    _layout(a)
    if (a.mode, a.d) != (train.mode, train.d):
      raise ConfigError(a.field, f"{a.where['x']} holds {_describe(a)} {list(a.x.shape)} but "
                        f"{train.where['x']} holds {_describe(train)} {list(train.x.shape)}")
    largest = max(largest, _check(a))
  top = max(int(a.y.max()) for a in files.values())
  if num_classes == 0:
    num_classes = top + 1
  elif top >= num_classes:
    a = next(a for a in files.values() if a.y.max() == top)
    raise ConfigError("data.num_classes", f"{a.where['y']}: example {_first(a.y == top)} has "
                      f"the label {top}, not below data.num_classes={num_classes}")

  sources = {split: _source(a) for split, a in files.items()}
  indices = {split: None for split in files}
  if "validation" not in files:
    n = train.x.shape[0]
    num_val = int(round(val_fraction * n))
    if not 0 < num_val < n:
      raise ConfigError("data.val_fraction", f"{val_fraction} of the {n} examples of "
                        f"{paths['train']} leaves {num_val} for validation and {n - num_val} "
                        f"for training; both need at least one (or set data.val_file)")
    perm = np.random.default_rng(VAL_SEED).permutation(n)
    indices["validation"], indices["train"] = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    files["validation"] = train
    sources["validation"] = SubsetSource(sources["train"], indices["validation"])
    sources["train"] = SubsetSource(sources["train"], indices["train"])

  max_num_tokens, label_counts = {}, {}
  for split, a in files.items():
    idx = indices[split] if indices.get(split) is not None else slice(None)
    lengths = a.lengths[idx] if a.lengths is not None else None
    max_num_tokens[split] = int(lengths.max()) if lengths is not None else a.steps
    label_counts[split] = np.bincount(a.y[idx], minlength=num_classes).tolist()
  return Prepared(kind="classify", vocab_size=largest + 2 if train.mode == "tokens" else 0,
                  num_classes=num_classes, sources=sources, max_num_tokens=max_num_tokens,
                  label_counts=label_counts, d_input=train.d)


TASK_SPECS = {
    "npz_classification": TaskSpec(
        kind="classify", fields=FIELDS, load=load,
        description="Your own sequences or images with class labels, from .npz/.npy files"),
}
