"""Synthetic recall tasks: multi-query associative recall, selective copying, induction heads.

Every generator returns a dict of stacked numpy arrays of one fixed length (no padding needed):

  "tokens"      int32 [num_examples, length]  token ids, all >= 1 (0 is reserved for padding)
  "targets"     int32 [num_examples, length]  the token the model must output at position t,
                                              i.e. after reading tokens[: t + 1] (next-token
                                              style, already shifted); IGNORE_INDEX (-100) at
                                              positions that carry no recall target
  "target_mask" bool  [num_examples, length]  targets != IGNORE_INDEX

An LM-style loss is cross-entropy of the logits at position t against targets[t], averaged over
target_mask; recall accuracy is the fraction of masked positions whose argmax equals the target.
The induction-head task has one target per example and also returns it as "label" [num_examples].

Each task has `validate_<task>_settings` (ValueError naming the bad argument) and
`<task>_targets(tokens, ...)`, which recomputes the targets of one example `[length]` from its
tokens alone (the tests use it to check the generators independently).

Randomness: numpy's PCG64 generator seeded with `seed`; the same arguments give the same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
IGNORE_INDEX = -100

# Issue 11: vocabulary 8192 and these (length, num_pairs) settings.
MQAR_VOCAB_SIZE = 8192
MQAR_SETTINGS: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (512, 64))

# Selective copying ids: noise/blank, the marker that asks for the next data token, then data.
NOISE_ID = 1
MARKER_ID = 2
DATA_OFFSET = 3

# Induction heads ids: the trigger, then ordinary tokens.
TRIGGER_ID = 1
INDUCTION_OFFSET = 2


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _finish(tokens: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
          "target_mask": targets != IGNORE_INDEX}


# --------------------------------------------------------------------------------------------
# Multi-query associative recall (Zoology, Arora et al. 2023)
# --------------------------------------------------------------------------------------------


def mqar_query_slots(length: int, num_pairs: int) -> int:
  """Number of places a query can go: (length - 2 num_pairs) // 2."""
  return (length - 2 * num_pairs) // 2


def mqar_gap_probs(num_slots: int, power_a: float) -> np.ndarray:
  """p(s) proportional to (s + 1)^(power_a - 1) for query slot s in [0, num_slots), `[num_slots]`.

  s + 1 is the distance, in slots of two tokens, from the end of the key-value context.
  """
  p = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
  return p / p.sum()


def validate_mqar_settings(length: int, num_pairs: int, vocab_size: int,
                           power_a: float) -> None:
  """Raises ValueError naming the argument when the settings admit no MQAR sequence."""
  _check_int("vocab_size", vocab_size, 4)
  _check_int("num_pairs", num_pairs, 1)
  _check_int("length", length, 1)
  if (isinstance(power_a, bool) or not isinstance(power_a, (int, float, np.floating))
      or not 0.0 < power_a < np.inf):
    raise ValueError(f"power_a must be a finite number > 0, got {power_a!r}")
  num_keys = vocab_size // 2 - 1
  num_values = vocab_size - vocab_size // 2
  if num_pairs > min(num_keys, num_values):
    raise ValueError(f"num_pairs={num_pairs} is more than the {min(num_keys, num_values)} "
                     f"distinct keys/values that vocab_size={vocab_size} offers (keys "
                     f"1..{vocab_size // 2 - 1}, values {vocab_size // 2}..{vocab_size - 1})")
  slots = mqar_query_slots(length, num_pairs)
  if slots < num_pairs:
    raise ValueError(f"length={length} is too short for num_pairs={num_pairs}: it needs "
                     f"2 * num_pairs context tokens plus 2 * num_pairs query slots, i.e. "
                     f"length >= {4 * num_pairs}")


def generate_mqar(num_examples: int, *, length: int = 64, num_pairs: int = 4,
                  vocab_size: int = MQAR_VOCAB_SIZE, power_a: float = 0.01,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Multi-query associative recall: `num_examples` sequences of `length` tokens.

  Construction of one example (P = num_pairs, V = vocab_size, S = (length - 2P) // 2):
    * keys: P distinct ids drawn uniformly from the key half 1..V//2 - 1; values: P distinct ids
      drawn uniformly from the value half V//2..V-1; pair i is (key_i, value_i).
    * context: tokens[0 : 2P] = k_1 v_1 k_2 v_2 ... k_P v_P.
    * queries: every key is queried exactly once. P distinct slots s in [0, S) are drawn without
      replacement with p(s) proportional to (s + 1)^(power_a - 1) (sequential weighted draws,
      done as Gumbel top-k), a power law in the distance from the context: small gaps are much
      more likely for power_a < 1, uniform for power_a = 1. The keys, in random order, go to
      positions 2P + 2s; targets at that position = the key's value (the model outputs the
      value right after reading the query key; the next input token is noise, not the value).
    * all other positions (odd positions after the context, unused slots, the tail when
      length - 2P is odd) hold noise: uniform over 1..V-1 except this example's P keys.
  This follows Zoology's MQAR (`power_a` = 0.01 by default), with two differences: id 0 never
  appears (padding), and noise never repeats one of the example's keys, so every key occurrence
  after the context is a labelled query and `mqar_targets` recovers the targets from the tokens.

  Returns {"tokens", "targets", "target_mask"} as described in the module docstring, each
  `[num_examples, length]`; exactly num_pairs target positions per example.
  """
  _check_int("num_examples", num_examples, 0)
  validate_mqar_settings(length, num_pairs, vocab_size, power_a)
  rng = np.random.default_rng(seed)
  n, p = num_examples, num_pairs
  half = vocab_size // 2
  keys = np.empty((n, p), dtype=np.int64)
  values = np.empty((n, p), dtype=np.int64)
  for i in range(n):
    keys[i] = 1 + rng.choice(half - 1, size=p, replace=False)
    values[i] = half + rng.choice(vocab_size - half, size=p, replace=False)
  # Gumbel top-k: the P largest of log p(s) + Gumbel noise are a weighted draw without
  # replacement; their order is random, so slot j gets key j in a random key order.
  slots = mqar_query_slots(length, p)
  scores = np.log(mqar_gap_probs(slots, power_a)) + rng.gumbel(size=(n, slots))
  gaps = np.argsort(-scores, axis=1)[:, :p]

  # Noise over 1..V-1 minus the keys: redraw the few draws that hit a key (row-wise lookup in
  # the sorted keys, offset by row so one flat searchsorted serves all rows).
  noise = rng.integers(1, vocab_size, size=(n, length))
  row = np.arange(n)[:, None] * vocab_size
  flat_keys = (np.sort(keys, axis=1) + row).reshape(-1)
  while True:
    flat = (noise + row).reshape(-1)
    idx = np.minimum(np.searchsorted(flat_keys, flat), flat_keys.size - 1)
    hit = (flat_keys[idx] == flat).reshape(n, length)
    if not hit.any():
      break
    noise[hit] = rng.integers(1, vocab_size, size=int(hit.sum()))

  tokens = noise
  tokens[:, 0:2 * p:2] = keys
  tokens[:, 1:2 * p:2] = values
  query_pos = 2 * p + 2 * gaps
  np.put_along_axis(tokens, query_pos, keys, axis=1)
  targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
  np.put_along_axis(targets, query_pos, values, axis=1)
  return _finish(tokens, targets)


def mqar_targets(tokens: Sequence[int] | np.ndarray, num_pairs: int) -> np.ndarray:
  """Targets `[length]` of one MQAR example, from its tokens alone.

  tokens[:2 * num_pairs] is the context k_1 v_1 ... k_P v_P; every later position holding some
  k_i gets target v_i, every other position IGNORE_INDEX.
  """
  tokens = np.asarray(tokens).reshape(-1)
  lookup = {int(k): int(v) for k, v in zip(tokens[0:2 * num_pairs:2],
                                           tokens[1:2 * num_pairs:2])}
  out = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int32)
  for t in range(2 * num_pairs, tokens.shape[0]):
    v = lookup.get(int(tokens[t]))
    if v is not None:
      out[t] = v
  return out


# --------------------------------------------------------------------------------------------
# Selective copying (Gu & Dao 2023, Mamba)
# --------------------------------------------------------------------------------------------


def validate_selective_copying_settings(length: int, num_tokens: int, vocab_size: int) -> None:
  """Raises ValueError naming the argument when no selective-copying sequence fits."""
  _check_int("vocab_size", vocab_size, DATA_OFFSET + 1)
  _check_int("num_tokens", num_tokens, 1)
  _check_int("length", length, 2)
  if length < 2 * num_tokens:
    raise ValueError(f"length={length} is too short for num_tokens={num_tokens}: the data "
                     f"tokens and as many markers need length >= {2 * num_tokens}")


def generate_selective_copying(num_examples: int, *, length: int = 4096, num_tokens: int = 16,
                               vocab_size: int = 17, seed: int = 0) -> dict[str, np.ndarray]:
  """Selective copying: `num_examples` sequences of `length` tokens.

  Ids: 0 padding (never used), NOISE_ID = 1 blank, MARKER_ID = 2 "output the next data token",
  data tokens DATA_OFFSET..vocab_size-1 (the default 17 is Mamba's 16-symbol alphabet, noise
  and marker included, plus the padding id).

  Construction of one example (M = num_tokens, L = length):
    * M data tokens d_1..d_M drawn uniformly (with replacement) from the data ids;
    * M distinct positions p_1 < ... < p_M drawn uniformly among 0..L-M-1; tokens[p_j] = d_j,
      the other positions of tokens[: L - M] are NOISE_ID;
    * tokens[L - M:] = MARKER_ID, and targets[L - M + j - 1] = d_j: at the j-th marker the model
      outputs the j-th data token, in order of appearance. Targets elsewhere are IGNORE_INDEX.

  Returns {"tokens", "targets", "target_mask"}, each `[num_examples, length]`.
  """
  _check_int("num_examples", num_examples, 0)
  validate_selective_copying_settings(length, num_tokens, vocab_size)
  rng = np.random.default_rng(seed)
  n, m = num_examples, num_tokens
  data = rng.integers(DATA_OFFSET, vocab_size, size=(n, m))
  tokens = np.full((n, length), NOISE_ID, dtype=np.int64)
  for i in range(n):
    pos = np.sort(rng.choice(length - m, size=m, replace=False))
    tokens[i, pos] = data[i]
  tokens[:, length - m:] = MARKER_ID
  targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
  targets[:, length - m:] = data
  return _finish(tokens, targets)


def selective_copying_targets(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
  """Targets `[length]` of one selective-copying example, from its tokens alone.

  The data tokens (ids >= DATA_OFFSET), in order, go to the marker positions, in order.
  """
  tokens = np.asarray(tokens).reshape(-1)
  data = tokens[tokens >= DATA_OFFSET]
  markers = np.flatnonzero(tokens == MARKER_ID)
  if data.size != markers.size:
    raise ValueError(f"{data.size} data tokens but {markers.size} markers")
  out = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int32)
  out[markers] = data
  return out


# --------------------------------------------------------------------------------------------
# Induction heads
# --------------------------------------------------------------------------------------------


def validate_induction_head_settings(length: int, vocab_size: int) -> None:
  """Raises ValueError naming the argument when no induction-head sequence fits."""
  _check_int("vocab_size", vocab_size, INDUCTION_OFFSET + 1)
  _check_int("length", length, 3)


def generate_induction_head(num_examples: int, *, length: int = 256, vocab_size: int = 20,
                            seed: int = 0) -> dict[str, np.ndarray]:
  """Induction heads: `num_examples` sequences of `length` tokens with one recall target each.

  Ids: 0 padding (never used), TRIGGER_ID = 1, ordinary tokens INDUCTION_OFFSET..vocab_size-1.

  Construction of one example (L = length):
    * every position holds an ordinary token drawn uniformly;
    * the first trigger goes to a position q drawn uniformly from 0..L-3, the second to L-1;
    * the answer is a = tokens[q + 1] (an ordinary token): targets[L - 1] = a, IGNORE_INDEX
      elsewhere. The trigger appears exactly twice.

  Returns {"tokens", "targets", "target_mask"}, each `[num_examples, length]`, and
  "label" int32 `[num_examples]` = the answer (= targets[:, -1]), for classification-style use.
  """
  _check_int("num_examples", num_examples, 0)
  validate_induction_head_settings(length, vocab_size)
  rng = np.random.default_rng(seed)
  n = num_examples
  tokens = rng.integers(INDUCTION_OFFSET, vocab_size, size=(n, length))
  first = rng.integers(0, length - 2, size=n)
  rows = np.arange(n)
  tokens[rows, first] = TRIGGER_ID
  tokens[:, -1] = TRIGGER_ID
  targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
  targets[:, -1] = tokens[rows, first + 1]
  out = _finish(tokens, targets)
  out["label"] = out["targets"][:, -1].copy()
  return out


def induction_head_targets(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
  """Targets `[length]` of one induction-head example, from its tokens alone.

  The token after the first TRIGGER_ID is the target at the second TRIGGER_ID.
  """
  tokens = np.asarray(tokens).reshape(-1)
  triggers = np.flatnonzero(tokens == TRIGGER_ID)
  if triggers.size != 2:
    raise ValueError(f"expected the trigger twice, found it {triggers.size} times")
  out = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int32)
  out[triggers[1]] = tokens[triggers[0] + 1]
  return out
