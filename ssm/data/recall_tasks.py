"""Tasks `mqar`, `selective_copying`, `induction_heads`: the synthetic recall generators of
`ssm.data.recall` as LM tasks, generated in memory when the task is loaded (a few seconds).

Examples (every split, every example `length` tokens, no padding):
  "tokens"   int32 [length]  ids 1..vocab-1 (0, padding, never occurs)
  "targets"  int32 [length]  the token to output after reading tokens[: t + 1], or IGNORE_INDEX
                             (-100) where there is nothing to recall
Prepared: kind "lm", vocab_size = data.vocab, max_num_tokens = data.length for every split.
Memory: tokens and targets take 8 bytes per position, e.g. 330 MB for 10,000 selective-copying
examples of 4096 tokens.

Settings (`config.data`), with their defaults:
  mqar               length 64, num_pairs 4, vocab 8192, power_a 0.01 (query-gap power law)
  selective_copying  length 4096, num_tokens 16, vocab 17
  induction_heads    length 256, vocab 20
  and for each: num_train (mqar 100,000, selective_copying 10,000, induction_heads 100,000),
  num_val 1,000, num_test 1,000 (examples per split) and gen_seed 0.
The MQAR defaults are Zoology's (Arora et al. 2023) first setting: vocabulary 8192, 100,000
training examples for (length 64, 4 pairs), power_a 0.01 for train and test, 1,000 test examples
(`zoology/experiments/mqar_example_configs/original_mqar_configs.py`; it trains the longer
settings (128, 8), (256, 16) on 20,000 examples, and its ICLR'24 figure-2 configs use 100,000
train and 3,000 test examples for every setting). The other generator defaults are those of
`ssm.data.recall` (Mamba's selective copying: 4096 tokens, 16 to copy, an alphabet of 16 symbols
with noise and marker).

Seeds: split s is `generate_*(num_s, seed=split_seed(gen_seed, s))`, where `split_seed` hashes
(gen_seed, index of s in ("train", "validation", "test")) with numpy's SeedSequence. The three
splits are independent draws: they differ, though with a small vocabulary or a short length an
example may occur in two splits by chance.
Bad settings raise ConfigError naming the field (the generators' argument vocab_size is the
field `vocab`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ssm.config import ConfigError
from ssm.data import recall
from ssm.data.prepared import SPLITS, ArraySource, Prepared, TaskSpec, setting_int

SPLIT_FIELDS = {"train": "num_train", "validation": "num_val", "test": "num_test"}

# Per task: {field: generator argument} of the generator settings.
MQAR_ARGS = {"length": "length", "num_pairs": "num_pairs", "vocab": "vocab_size",
             "power_a": "power_a"}
SELECTIVE_COPYING_ARGS = {"length": "length", "num_tokens": "num_tokens", "vocab": "vocab_size"}
INDUCTION_HEADS_ARGS = {"length": "length", "vocab": "vocab_size"}


def split_seed(gen_seed: int, split: str) -> int:
  """The generator seed of `split`: the first 32-bit word of SeedSequence([gen_seed, i]),
  i = 0, 1, 2 for train, validation, test."""
  return int(np.random.SeedSequence([gen_seed, SPLITS.index(split)]).generate_state(1)[0])


def _config_error(error: ValueError, args: Mapping[str, str]) -> ConfigError:
  """A generator's ValueError as a ConfigError naming the field of the first argument the
  message mentions (argument names in the message become "data.<field>")."""
  to_field = {arg: field for field, arg in args.items()}
  pattern = re.compile(r"\b(" + "|".join(map(re.escape, to_field)) + r")\b")
  message = str(error)
  found = pattern.search(message)
  if found is None:
    raise error
  message = pattern.sub(lambda m: f"data.{to_field[m.group(1)]}", message)
  return ConfigError(f"data.{to_field[found.group(1)]}", message)


def _load(settings: Mapping[str, Any], *, data_dir: str | None = None,
          manual_dir: str | None = None, generate: Callable[..., dict[str, np.ndarray]],
          validate: Callable[..., None], args: Mapping[str, str]) -> Prepared:
  """Generates the three splits in memory (see the module doc); nothing is written."""
  del data_dir, manual_dir  # generated in memory
  kwargs = {arg: settings[field] for field, arg in args.items()}
  try:
    validate(**kwargs)
  except ValueError as e:
    raise _config_error(e, args) from None
  sizes = {split: setting_int(settings, field) for split, field in SPLIT_FIELDS.items()}
  gen_seed = setting_int(settings, "gen_seed", low=0)
  sources = {}
  for split, n in sizes.items():
    out = generate(n, seed=split_seed(gen_seed, split), **kwargs)
    sources[split] = ArraySource({"tokens": out["tokens"], "targets": out["targets"]})
  length = int(kwargs["length"])
  return Prepared(kind="lm", vocab_size=int(kwargs["vocab_size"]), num_classes=0,
                  sources=sources, max_num_tokens={s: length for s in SPLITS})


load_mqar = functools.partial(_load, generate=recall.generate_mqar,
                              validate=recall.validate_mqar_settings, args=MQAR_ARGS)
load_selective_copying = functools.partial(
    _load, generate=recall.generate_selective_copying,
    validate=recall.validate_selective_copying_settings, args=SELECTIVE_COPYING_ARGS)
load_induction_heads = functools.partial(
    _load, generate=recall.generate_induction_head,
    validate=recall.validate_induction_head_settings, args=INDUCTION_HEADS_ARGS)

_SPLIT_DEFAULTS = {"num_val": 1_000, "num_test": 1_000, "gen_seed": 0}

TASK_SPECS = {
    "mqar": TaskSpec(
        kind="lm",
        fields={"length": 64, "num_pairs": 4, "vocab": recall.MQAR_VOCAB_SIZE, "power_a": 0.01,
                "num_train": 100_000, **_SPLIT_DEFAULTS},
        load=load_mqar,
        description="Multi-query associative recall (Zoology): recall the value of each queried "
                    "key"),
    "selective_copying": TaskSpec(
        kind="lm",
        fields={"length": 4096, "num_tokens": 16, "vocab": 17, "num_train": 10_000,
                **_SPLIT_DEFAULTS},
        load=load_selective_copying,
        description="Selective copying (Mamba): output the scattered data tokens in order"),
    "induction_heads": TaskSpec(
        kind="lm",
        fields={"length": 256, "vocab": 20, "num_train": 100_000, **_SPLIT_DEFAULTS},
        load=load_induction_heads,
        description="Induction heads: after the second trigger, output the token that "
                    "followed the first"),
}
