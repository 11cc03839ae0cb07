"""Grain pipelines: padded, masked batches for training and eval.

The source is any random-access sequence of examples (a TFDS data source, a list, the windows of
a token stream) in the format of `ssm.data.prepared`: "tokens" int [n] (or float [n, d]
features), optionally "tokens2" int [m] (a second document), "label" int, "targets" int [n].

Train:  source -> pad to seq_len -> this process's shard (every process_count-th example)
        -> shuffle (seeded; a new permutation each epoch) -> repeat forever -> batch.
Eval:   source -> this process's shard -> pad -> one pass, no shuffle; the last batch is filled
        up with copies of a real example whose "weight" is 0, so no example is dropped and every
        process yields the same number of batches (a collective step never waits on a process
        that ran out).

Batches are dicts of numpy arrays (batch_size is per process):
  "tokens"  int32 [batch, seq_len]     token ids, 0 after the end; float32 [batch, seq_len, d]
                                       for features; int32 [batch, seq_len, 2] for pairs
                                       ("tokens" and "tokens2" side by side)
  "mask"    bool  [batch, seq_len]     True on real tokens ([batch, seq_len, 2] for pairs)
  "label"   int32 [batch]              when the examples have labels
  "targets" int32 [batch, seq_len]     when the examples have targets; IGNORE_INDEX after the end
  "weight"  float32 [batch]            1 for real examples, 0 for eval filler
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from ssm.data.prepared import IGNORE_INDEX, TokenStream

Batch = dict[str, np.ndarray]

# Each element handed to the prefetch threads is a whole batch, so a few threads and a short
# buffer keep the accelerator fed without holding many batches of long sequences in memory.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

_STATE_VERSION = 1


class ExampleTooLongError(ValueError):
  """An example has more tokens than the pipeline's seq_len (and truncate is off)."""


def _pad(values: np.ndarray, *, index: int, seq_len: int, truncate: bool, fill, field: str):
  """values [n, ...] -> ([seq_len, ...] padded with `fill`, n kept)."""
  n = values.shape[0]
  if n > seq_len:
    if not truncate:
      raise ExampleTooLongError(
          f"example {index} has {n} {field}, more than seq_len={seq_len}; raise seq_len "
          f"(data.seq_len) or pass truncate=True (data.truncate) to keep the first "
          f"seq_len tokens")
    values, n = values[:seq_len], seq_len
  padded = np.full((seq_len,) + values.shape[1:], fill, dtype=values.dtype)
  padded[:n] = values
  return padded, n


def pad_example(example: Mapping[str, Any], *, index: int, seq_len: int, truncate: bool = False,
                weight: float = 1.0) -> dict[str, np.ndarray]:
  """Pads one example to `seq_len` positions and adds its mask and weight (see the module doc).

  `index` is the example's index in the source; it only serves the error message.
  Raises ExampleTooLongError if a sequence is longer than seq_len and truncate is False;
  with truncate=True only the first seq_len positions are kept.
  """
  pad = lambda v, fill, field: _pad(v, index=index, seq_len=seq_len, truncate=truncate,
                                    fill=fill, field=field)
  tokens = np.asarray(example["tokens"])
  if np.issubdtype(tokens.dtype, np.floating):
    tokens = tokens.astype(np.float32).reshape(tokens.shape[0], -1)
  else:
    tokens = tokens.astype(np.int32).reshape(-1)
  out = {}
  out["tokens"], n = pad(tokens, 0, "tokens")
  out["mask"] = np.arange(seq_len) < n
  if "tokens2" in example:
    second, m = pad(np.asarray(example["tokens2"], dtype=np.int32).reshape(-1), 0, "tokens")
    out["tokens"] = np.stack([out["tokens"], second], axis=-1)
    out["mask"] = np.stack([out["mask"], np.arange(seq_len) < m], axis=-1)
  if "targets" in example:
    out["targets"], _ = pad(np.asarray(example["targets"], dtype=np.int32).reshape(-1),
                            IGNORE_INDEX, "targets")
  if "label" in example:
    out["label"] = np.asarray(example["label"], dtype=np.int32)
  out["weight"] = np.asarray(weight, dtype=np.float32)
  return out


class StreamWindows(Sequence):
  """A token stream as consecutive windows: example i = {"tokens": tokens[i*L : (i+1)*L]}
  (int32 [L]); the last partial window is dropped. An LM predicts tokens[t+1] from tokens[:t+1]
  inside each window."""

  def __init__(self, stream: TokenStream, window: int):
    _check_positive(window, "window")
    self._tokens, self._window = stream.tokens, int(window)

  def __len__(self) -> int:
    return int(self._tokens.shape[0]) // self._window

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} out of range for {len(self)}")
    w = self._window
    return {"tokens": np.asarray(self._tokens[i * w:(i + 1) * w], dtype=np.int32)}


class _First(Sequence):
  def __init__(self, source: Sequence, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


def first(source: Sequence, n: int) -> Sequence:
  """The first n examples of `source` (all of them when it has fewer)."""
  return _First(source, n)


def _check_positive(value: int, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  _check_positive(count, "process_count")
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, process_count={count}), got {index!r}")
  return int(index), int(count)


class TrainIterator:
  """An endless iterator of training batches whose position can be saved and restored.

  `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator built with
  the same settings continues with exactly the batch that would have come next. The state
  records the settings, so restoring it into a differently configured pipeline (other seed,
  batch size, seq_len, shard or dataset size) raises instead of silently yielding other data.
  """

  def __init__(self, dataset: grain.MapDataset, settings: dict[str, Any],
               read_options: grain.ReadOptions):
    self._settings = settings
    self._iter = iter(dataset.to_iter_dataset(read_options))

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, "settings": dict(self._settings),
            "grain": self._iter.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or "grain" not in state or "settings" not in state:
      raise ValueError(f"not a TrainIterator state: {state!r}")
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"TrainIterator state version {state.get('version')!r} is not "
                       f"{_STATE_VERSION}")
    saved = dict(state["settings"])
    if saved != self._settings:
      diff = sorted(k for k in set(saved) | set(self._settings)
                    if saved.get(k) != self._settings.get(k))
      raise ValueError("the saved data-iterator state was made by a pipeline with other "
                       "settings: " + ", ".join(
                           f"{k}: saved {saved.get(k)!r}, now {self._settings.get(k)!r}"
                           for k in diff))
    self._iter.set_state(dict(state["grain"]))


def train_iterator(source: Sequence[Mapping[str, Any]], *, batch_size: int, seq_len: int,
                   seed: int, process_index: int | None = None,
                   process_count: int | None = None, truncate: bool = False,
                   read_options: grain.ReadOptions | None = None) -> TrainIterator:
  """Endless shuffled training batches of this process's shard of `source`.

  Process p of c reads examples p, p + c, p + 2c, ... (defaults: jax.process_index() and
  jax.process_count()). Each epoch over the shard is a fresh permutation derived from `seed`
  and the epoch number. Batches run across epoch boundaries, so no example is ever dropped.
  An example longer than seq_len raises ExampleTooLongError (naming its source index) when
  its batch is read, unless truncate=True.
  """
  _check_positive(batch_size, "batch_size")
  _check_positive(seq_len, "seq_len")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  index, count = _resolve_process(process_index, process_count)
  n = len(source)
  if n <= index:
    raise ValueError(f"process {index} of {count} gets no training example: the source has "
                     f"only {n}")

  def pad(i: int, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return pad_example(example, index=i, seq_len=seq_len, truncate=truncate)

  # Padding is attached before the shard so that `i` is the index in the source. Map is lazy:
  # only the examples read are padded.
  ds = grain.MapDataset.source(source).map_with_index(pad)
  ds = ds[index::count].shuffle(seed=int(seed)).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  settings = {"num_examples": n, "batch_size": int(batch_size), "seq_len": int(seq_len),
              "seed": int(seed), "process_index": index, "process_count": count,
              "truncate": bool(truncate)}
  return TrainIterator(ds, settings, read_options or DEFAULT_READ_OPTIONS)


class EvalBatches:
  """One pass over this process's shard, in source order, in `len(self)` batches.

  Iterating again starts a new pass. `num_examples` counts this process's real examples (the
  sum of the weights over a pass).
  """

  def __init__(self, dataset: grain.MapDataset, num_examples: int,
               read_options: grain.ReadOptions):
    self._dataset = dataset
    self.num_examples = num_examples
    self._read_options = read_options

  def __len__(self) -> int:
    return len(self._dataset)

  def __iter__(self) -> Iterator[Batch]:
    if len(self._dataset) == 0:
      return iter(())
    return iter(self._dataset.to_iter_dataset(self._read_options))


def eval_batches(source: Sequence[Mapping[str, Any]], *, batch_size: int, seq_len: int,
                 process_index: int | None = None, process_count: int | None = None,
                 truncate: bool = False,
                 read_options: grain.ReadOptions | None = None) -> EvalBatches:
  """Every example of this process's shard exactly once, with weight 1, in source order.

  Every process yields ceil(ceil(n / process_count) / batch_size) batches; the slots left after
  its real examples hold a copy of one real example with weight 0. A copy rather than an empty
  row because an all-False mask would make mean pooling divide by zero, and 0 * NaN is NaN.
  """
  _check_positive(batch_size, "batch_size")
  _check_positive(seq_len, "seq_len")
  index, count = _resolve_process(process_index, process_count)
  n = len(source)
  local = len(range(index, n, count))
  num_batches = math.ceil(math.ceil(n / count) / batch_size)
  # The filler: this process's first example, or example 0 when its shard is empty.
  filler_index = index if local else 0

  def load(j: int) -> dict[str, np.ndarray]:
    if j < local:
      i = index + j * count
      return pad_example(source[i], index=i, seq_len=seq_len, truncate=truncate)
    return pad_example(source[filler_index], index=filler_index, seq_len=seq_len,
                       truncate=truncate, weight=0.0)

  ds = grain.MapDataset.range(num_batches * batch_size).map(load)
  ds = ds.batch(batch_size, drop_remainder=True)
  return EvalBatches(ds, local, read_options or DEFAULT_READ_OPTIONS)
