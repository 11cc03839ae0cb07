"""ListOps generator, tokenizer and evaluator, checked against an independent evaluator."""

from __future__ import annotations

import hashlib
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pytest

from ssm.data import listops

ROOT = pathlib.Path(__file__).resolve().parents[3]

# Small settings: quick, yet deep enough (3 nested brackets) and wide enough to exercise limits.
SMALL = dict(min_length=10, max_length=120, max_depth=4, max_args=5)


def reference_value(text: str) -> int:
  """Evaluates an expression by turning it into nested Python calls, e.g. MAX(2,MIN(4,7,),)."""
  parts = []
  for tok in text.split():
    if tok in ("(", ")"):
      continue
    if tok.startswith("["):
      parts.append(tok[1:] + "(")
    elif tok == "]":
      parts.append("),")
    else:
      parts.append(str(int(tok)) + ",")
  funcs = {"MIN": lambda *a: min(a), "MAX": lambda *a: max(a),
           # LRA release targets: int(numpy.median(args)), i.e. the mean of the two middle
           # values truncated for an even count.
           "MED": lambda *a: int(statistics.median(a)), "SM": lambda *a: sum(a) % 10}
  return eval("".join(parts).rstrip(","), funcs)  # pylint: disable=eval-used


def structure(text: str) -> tuple[int, list[int]]:
  """(deepest bracket nesting, argument count of every operator) of an expression."""
  stack: list[int] = []
  deepest, arities = 0, []
  for tok in text.split():
    if tok.startswith("["):
      stack.append(0)
      deepest = max(deepest, len(stack))
    elif tok == "]":
      arities.append(stack.pop())
      if stack:
        stack[-1] += 1
    elif stack:
      stack[-1] += 1
  assert not stack
  return deepest, arities


def test_vocabulary_layout():
  assert listops.VOCAB[0] == "<pad>" and listops.PAD_ID == 0
  assert listops.VOCAB[1:11] == tuple(str(d) for d in range(10))
  assert listops.VOCAB[11:15] == ("[MIN", "[MAX", "[MED", "[SM")
  assert listops.VOCAB[15] == "]" and listops.VOCAB_SIZE == 16
  assert listops.NUM_CLASSES == 10


def test_tokenize_ignores_parentheses_and_round_trips():
  text = "[MAX 2 9 [MIN 4 7 ] 0 ]"
  ids = listops.tokenize(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [12, 3, 10, 11, 5, 8, 15, 1, 15])
  with_parens = "( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"
  np.testing.assert_array_equal(listops.tokenize(with_parens), ids)
  assert listops.detokenize(np.concatenate([ids, [0, 0]])) == text


def test_tokenize_unknown_token_names_it_and_its_position():
  with pytest.raises(ValueError, match=r"'\[ADD'.*position 1"):
    listops.tokenize("[MAX [ADD 1 2 ] 3 ]")


@pytest.mark.parametrize("text,value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[SM 4 [MIN 7 8 ] ]", 1),          # (4 + 7) mod 10
    ("[MED 1 9 4 6 ]", 5),              # middle values 4, 6 -> 5
    ("[MED 3 4 ]", 3),                  # 3.5 truncated
    ("[MED 5 1 3 ]", 3),
    ("[MIN [MAX 1 2 ] [SM 9 9 9 ] ]", 2),
])
def test_evaluate_hand_computed(text, value):
  assert listops.evaluate(text) == value
  assert reference_value(text) == value


@pytest.mark.parametrize("text", ["[MAX 2", "] 3", "3 4", "[MIN ]", "", "[SM 1 2 ] 4"])
def test_evaluate_rejects_malformed(text):
  with pytest.raises(ValueError, match="malformed"):
    listops.evaluate(text)


def test_generate_bounds_labels_depth_arity_and_uniqueness():
  examples = list(listops.generate(400, seed=7, **SMALL))
  assert len(examples) == 400
  seen, arities, deepest, labels = set(), [], 0, []
  for tokens, label in examples:
    assert tokens.dtype == np.int32
    assert SMALL["min_length"] < tokens.size < SMALL["max_length"]
    text = listops.detokenize(tokens)
    assert reference_value(text) == label
    d, a = structure(text)
    deepest, arities = max(deepest, d), arities + a
    seen.add(tuple(tokens.tolist()))
    labels.append(label)
  assert len(seen) == 400
  # max_depth counts tree levels with the leaves, so brackets nest max_depth - 1 deep; the
  # generator must reach every limit, not just stay within it.
  assert deepest == SMALL["max_depth"] - 1
  assert min(arities) == 2 and max(arities) == SMALL["max_args"]
  assert set(labels) == set(range(10))


def test_generate_is_deterministic_and_seeded():
  a = list(listops.generate(50, seed=3, **SMALL))
  b = list(listops.generate(50, seed=3, **SMALL))
  c = list(listops.generate(50, seed=4, **SMALL))
  assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
  assert sum(np.array_equal(x[0], y[0]) for x, y in zip(a, c)) < 5


def test_generate_does_not_depend_on_the_hash_seed():
  code = ("import hashlib; from ssm.data import listops\n"
          "h = hashlib.sha256()\n"
          "for t, l in listops.generate(300, seed=5, min_length=3, max_length=30, max_depth=3,"
          " max_args=3): h.update(t.tobytes() + bytes([l]))\n"
          "print(h.hexdigest())")
  digests = set()
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    digests.add(out)
  h = hashlib.sha256()
  for t, l in listops.generate(300, seed=5, min_length=3, max_length=30, max_depth=3,
                               max_args=3):
    h.update(t.tobytes() + bytes([l]))
  assert digests == {h.hexdigest()}


def test_generate_finds_every_expression_of_a_small_space_once():
  # depth 2 with exactly 2 arguments: an operator over two digits, 4 * 10 * 10 expressions.
  settings = dict(min_length=0, max_length=5, max_depth=2, max_args=2, seed=0)
  examples = list(listops.generate(400, **settings))
  assert len({tuple(t.tolist()) for t, _ in examples}) == 400
  with pytest.raises(RuntimeError, match="only 400 of 401"):
    list(listops.generate(401, max_attempts=20_000, **settings))


@pytest.mark.parametrize("kwargs,message", [
    (dict(min_length=10, max_length=11), "no token count"),
    (dict(max_depth=1), "max_depth"),
    (dict(max_args=1), "max_args"),
    (dict(min_length=100, max_length=200, max_depth=3, max_args=3), "unreachable"),
    (dict(operator_prob=0.0), "operator_prob"),
])
def test_generate_rejects_impossible_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    listops.generate(1, **kwargs)


def test_operator_probability():
  assert listops.auto_operator_prob(500, 10, 10) == listops.LRA_OPERATOR_PROB
  # Mean size from the recursion matches a direct simulation of the same branching process
  # (without the length filter): a node below the root is an operator with probability p.
  rng = np.random.default_rng(0)
  p, depth_limit, max_args = 0.3, 4, 5

  def size(depth):
    if depth > 1 and (depth >= depth_limit or rng.random() >= p):
      return 1
    return 2 + sum(size(depth + 1) for _ in range(rng.integers(2, max_args + 1)))

  sim = np.mean([size(1) for _ in range(20_000)])
  expected = listops.expected_num_tokens(p, depth_limit, max_args)
  assert abs(sim - expected) / expected < 0.02
  assert listops.max_possible_tokens(3, 4) == 2 + 4 * (2 + 4)
