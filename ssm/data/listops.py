"""ListOps: nested list operations on digits, the LRA long-sequence classification task.

An expression is a tree whose leaves are digits 0-9 and whose internal nodes are operators with
2..max_args arguments:

  MIN  smallest argument          MAX  largest argument
  MED  median; for an even count, floor((a + b) / 2) of the two middle values a <= b
  SM   sum of the arguments mod 10

The median convention is the one that produced the targets of the LRA release (`int` of numpy's
median, which averages the two middle values), so `evaluate` agrees with the release TSV files.
The label is the value of the whole expression, one of 10 classes.

Text form: space-separated tokens, an operator opens with "[MIN" / "[MAX" / "[MED" / "[SM" and
closes with "]", e.g. "[MAX 2 9 [MIN 4 7 ] 0 ]" (value 9). The LRA release also wraps every pair
in "(" and ")"; `tokenize` ignores those.

Vocabulary (fixed): 0 = padding, 1..10 = digits 0..9, 11..14 = [MIN [MAX [MED [SM, 15 = "]".

Generation follows the LRA recipe: a node at depth d (the root has depth 1) is an operator with
probability `operator_prob` while d < max_depth, otherwise a digit; so the tree has at most
max_depth levels and at most max_depth - 1 nested brackets. The root is always an operator (a lone
digit never passes a length filter with min_length >= 1). Expressions are kept when
min_length < num_tokens < max_length and they are new; the random stream is Python's Mersenne
Twister seeded with `seed`, so the list is the same on every run and platform, whatever
PYTHONHASHSEED is.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

import numpy as np

PAD_ID = 0
DIGIT_OFFSET = 1  # token id of digit v is v + DIGIT_OFFSET
OPERATORS: tuple[str, ...] = ("MIN", "MAX", "MED", "SM")
OPERATOR_OFFSET = 11  # token id of OPERATORS[i] is i + OPERATOR_OFFSET
CLOSE_ID = 15
VOCAB: tuple[str, ...] = (
    ("<pad>",) + tuple(str(v) for v in range(10)) + tuple("[" + op for op in OPERATORS) + ("]",))
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10
# The LRA release brackets every pair with "(" ... ")"; they carry no information.
IGNORED_TOKENS = frozenset({"(", ")"})

_TOKEN_TO_ID = {tok: i for i, tok in enumerate(VOCAB) if i != PAD_ID}

# The published LRA setting; also the defaults below.
LRA_OPERATOR_PROB = 0.25


def tokenize(text: str) -> np.ndarray:
  """Maps an expression to token ids, `[num_tokens]` int32; "(" and ")" are dropped.

  Raises ValueError naming the first unknown token and its position (0-based, among the
  whitespace-separated pieces of `text`).
  """
  ids = []
  for pos, tok in enumerate(text.split()):
    if tok in IGNORED_TOKENS:
      continue
    tid = _TOKEN_TO_ID.get(tok)
    if tid is None:
      raise ValueError(f"unknown ListOps token {tok!r} at position {pos}; known tokens: "
                       f"{' '.join(VOCAB[1:])} (and '(' ')', ignored)")
    ids.append(tid)
  return np.asarray(ids, dtype=np.int32)


def detokenize(tokens: Sequence[int] | np.ndarray) -> str:
  """Inverse of `tokenize` (without the optional parentheses); padding ids are skipped."""
  return " ".join(VOCAB[int(t)] for t in tokens if int(t) != PAD_ID)


def _apply(op: int, args: list[int]) -> int:
  if op == 0:
    return min(args)
  if op == 1:
    return max(args)
  if op == 2:
    s = sorted(args)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
  return sum(args) % 10


def evaluate_tokens(tokens: Sequence[int] | np.ndarray) -> int:
  """Value (0..9) of a tokenised expression; padding ids are skipped.

  Raises ValueError on a malformed expression (unbalanced brackets, an operator without
  arguments, several top-level values).
  """
  stack: list[tuple[int, list[int]]] = []
  result: int | None = None
  for pos, t in enumerate(int(t) for t in tokens):
    if t == PAD_ID:
      continue
    if OPERATOR_OFFSET <= t < OPERATOR_OFFSET + len(OPERATORS):
      if result is not None:
        raise ValueError(f"malformed ListOps expression: operator after the end at token {pos}")
      stack.append((t - OPERATOR_OFFSET, []))
      continue
    if DIGIT_OFFSET <= t < DIGIT_OFFSET + 10:
      value = t - DIGIT_OFFSET
    elif t == CLOSE_ID:
      if not stack:
        raise ValueError(f"malformed ListOps expression: unmatched ']' at token {pos}")
      op, args = stack.pop()
      if not args:
        raise ValueError(f"malformed ListOps expression: operator without arguments closed at "
                         f"token {pos}")
      value = _apply(op, args)
    else:
      raise ValueError(f"token id {t} at token {pos} is not in the ListOps vocabulary "
                       f"(0..{VOCAB_SIZE - 1})")
    if stack:
      stack[-1][1].append(value)
    elif result is None:
      result = value
    else:
      raise ValueError(f"malformed ListOps expression: second top-level value at token {pos}")
  if stack:
    raise ValueError(f"malformed ListOps expression: {len(stack)} unclosed operator(s)")
  if result is None:
    raise ValueError("malformed ListOps expression: empty")
  return result


def evaluate(text: str) -> int:
  """Value (0..9) of an expression in text form, e.g. evaluate("[SM 4 [MIN 7 8 ] ]") == 1."""
  return evaluate_tokens(tokenize(text))


def expected_num_tokens(operator_prob: float, max_depth: int, max_args: int) -> float:
  """Mean token count of a generated tree before the length filter.

  With m = (2 + max_args) / 2 arguments on average and E_d the mean size of a subtree rooted at
  depth d: E_max_depth = 1, E_d = (1 - p) + p (2 + m E_{d+1}), and the root (always an operator)
  has 2 + m E_2 tokens.
  """
  m = (2 + max_args) / 2
  e = 1.0
  for _ in range(max_depth - 2):
    e = (1.0 - operator_prob) + operator_prob * (2.0 + m * e)
  return 2.0 + m * e


def auto_operator_prob(min_length: int, max_depth: int, max_args: int) -> float:
  """The operator probability whose mean tree size is about min_length, rounded to 0.01.

  Why: sizes are heavy-tailed, so at this probability a good fraction of trees land just above
  min_length while few grow past max_length (growth past max_length is cut short anyway). For
  the LRA setting (500, depth 10, 10 args) it gives the published 0.25; for short demo lengths
  (20..200) about 0.11, where 0.25 would waste most trees on the upper bound. Clipped to
  [0.01, 0.5].
  """
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if expected_num_tokens(mid, max_depth, max_args) < min_length + 1:
      lo = mid
    else:
      hi = mid
  return float(min(0.5, max(0.01, round(hi, 2))))


def max_possible_tokens(max_depth: int, max_args: int) -> int:
  """Token count of the largest tree: every node above the last level has max_args children."""
  size = 1
  for _ in range(max_depth - 1):
    size = 2 + max_args * size
  return size


class _TooLong(Exception):
  pass


def validate_settings(min_length: int, max_length: int, max_depth: int, max_args: int,
                      operator_prob: float) -> None:
  """Raises ValueError naming the argument when the settings admit no expression."""
  for name, value, low in (("max_depth", max_depth, 2), ("max_args", max_args, 2),
                           ("min_length", min_length, 0), ("max_length", max_length, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if (isinstance(operator_prob, bool) or not isinstance(operator_prob, (int, float))
      or not 0.0 < operator_prob <= 1.0):
    raise ValueError(f"operator_prob must be in (0, 1], got {operator_prob!r}")
  # The smallest tree is an operator with two digits: 4 tokens.
  if max_length <= max(min_length + 1, 4):
    raise ValueError(f"no token count n satisfies min_length < n < max_length with "
                     f"min_length={min_length}, max_length={max_length} (and n >= 4)")
  biggest = max_possible_tokens(max_depth, max_args)
  if biggest <= min_length:
    raise ValueError(f"min_length={min_length} is unreachable: the largest tree with "
                     f"max_depth={max_depth}, max_args={max_args} has {biggest} tokens")


def generate(num_examples: int, *, min_length: int = 500, max_length: int = 2000,
             max_depth: int = 10, max_args: int = 10, seed: int = 0,
             operator_prob: float | None = None,
             max_attempts: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
  """An iterator over `num_examples` distinct (tokens `[num_tokens]` int32, label) pairs.

  Args:
    num_examples: how many expressions to yield.
    min_length, max_length: keep an expression when min_length < num_tokens < max_length.
    max_depth: tree levels, leaves included (at most max_depth - 1 nested brackets).
    max_args: each operator takes 2..max_args arguments, uniformly.
    seed: seed of the random stream; the same arguments give the same sequence.
    operator_prob: probability that a non-root node above the last level is an operator;
      None -> `auto_operator_prob(min_length, max_depth, max_args)`.
    max_attempts: give up (RuntimeError) after this many trees; default 1000 per example
      plus 10^5, which only triggers when the settings admit too few distinct expressions.
  """
  if (isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer))
      or num_examples < 0):
    raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}")
  if operator_prob is None:
    operator_prob = auto_operator_prob(min_length, max_depth, max_args)
  # Checked here, not on the first next(), so that bad settings fail where they are given.
  validate_settings(min_length, max_length, max_depth, max_args, operator_prob)
  if max_attempts is None:
    max_attempts = 1000 * num_examples + 100_000
  return _generate(num_examples, min_length, max_length, max_depth, max_args, seed,
                   float(operator_prob), max_attempts)


def _generate(num_examples: int, min_length: int, max_length: int, max_depth: int,
              max_args: int, seed: int, p: float,
              max_attempts: int) -> Iterator[tuple[np.ndarray, int]]:
  rand = random.Random(seed).random
  n_args = max_args - 1  # the argument count is 2 + int(rand() * n_args)

  def grow(depth: int, out: list[int]) -> int:
    # Draw order per operator: operator, argument count, then the arguments left to right.
    op = int(rand() * 4)
    args = []
    out.append(OPERATOR_OFFSET + op)
    for _ in range(2 + int(rand() * n_args)):
      if depth + 1 < max_depth and rand() < p:
        args.append(grow(depth + 1, out))
      else:
        v = int(rand() * 10)
        out.append(DIGIT_OFFSET + v)
        args.append(v)
      if len(out) >= max_length:  # the final count can only be larger: stop growing now
        raise _TooLong
    out.append(CLOSE_ID)
    return _apply(op, args)

  seen: set[bytes] = set()
  attempts = 0
  while len(seen) < num_examples:
    attempts += 1
    if attempts > max_attempts:
      raise RuntimeError(
          f"ListOps generation found only {len(seen)} of {num_examples} distinct expressions "
          f"in {max_attempts} attempts (min_length={min_length}, max_length={max_length}, "
          f"max_depth={max_depth}, max_args={max_args}, operator_prob={p}); widen the "
          f"length range or ask for fewer examples")
    out: list[int] = []
    try:
      label = grow(1, out)
    except _TooLong:
      continue
    if not min_length < len(out) < max_length:
      continue
    key = hashlib.blake2b(bytes(out), digest_size=16).digest()
    if key in seen:
      continue
    seen.add(key)
    yield np.asarray(out, dtype=np.int32), label
