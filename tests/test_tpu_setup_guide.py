"""TPU_SETUP.md names only things that exist: every `python -m ssm` command parses with the real
command-line parser, its config file and preset load, and its `--config.*` overrides validate;
every standalone `--config.*` flag and dotted config field (`train.checkpoint_dir`) is a field of
the config; every repository path exists; every `make` target is in the Makefile."""

from __future__ import annotations

import importlib
import math
import re
import shlex

import pytest

from ssm import __main__ as cli
from ssm import bench
from ssm import config as config_lib
from tests.devices import ROOT

GUIDE = ROOT / "TPU_SETUP.md"
SECTIONS = ("model", "data", "optim", "mesh", "train")
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_SSM_COMMAND = re.compile(r"python -m ssm +(\S+)([^\"'>;|&\n]*)")
_FLAG = re.compile(r"--config\.([\w.]+)=([^\s\"']+)")
_FIELD = re.compile(rf"^(?:--config\.)?((?:{'|'.join(SECTIONS)})(?:\.\w+)+)$")
_REPO_PATH = re.compile(r"\b((?:experiments|tests|ssm|layers|notebooks|docs)/[\w./-]*\w)")
_MAKE = re.compile(r"(?:^|&&|;) *make (\w+)", re.M)


def snippets(text: str) -> list[str]:
  """The code of a markdown text: each fenced block (continuation lines joined) and each inline
  code span, in order."""
  blocks = [b.replace("\\\n", " ") for b in _FENCE.findall(text)]
  prose = _FENCE.sub("", text)
  return blocks + _INLINE.findall(prose)


def _mesh_devices(config) -> int:
  """The device count a config's mesh asks for (an axis of -1 takes 1 device here)."""
  return math.prod(size for size in config.mesh.values() if size > 0)


def _check_run_command(command: str, argv: list[str]) -> None:
  args, overrides = cli._parse_run_args(command, argv)  # pylint: disable=protected-access
  path = args.config.partition(":")[0]
  if not (ROOT / path).is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  config = config_lib.apply_overrides(config_lib.load_config_file(str(ROOT / args.config)),
                                      overrides)
  config_lib.validate(config, num_devices=_mesh_devices(config))


def _check_bench_command(argv: list[str]) -> None:
  args = bench.build_parser().parse_args(argv)
  ops = [op for group in args.ops for op in group]  # each --ops word is a comma-separated list
  unknown = sorted(set(ops) - set(bench.CASES))
  if unknown:
    raise ValueError(f"unknown bench ops {unknown}")


def _check_flags(flags: list[tuple[str, str]]) -> None:
  config = config_lib.apply_overrides(config_lib.default_config(),
                                      [f"{field}={value}" for field, value in flags])
  config_lib.validate(config, num_devices=_mesh_devices(config))


def _has_field(dotted: str) -> bool:
  node = config_lib.default_config()
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def guide_problems(text: str) -> list[str]:
  """Everything the guide names that does not exist, one message each."""
  problems = []
  makefile_targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
  for code in snippets(text):
    commands = list(_SSM_COMMAND.finditer(code))
    for match in commands:
      command, rest = match.group(1), match.group(2)
      try:
        argv = shlex.split(rest)
        if command not in cli.COMMANDS:
          raise ValueError(f"no such subcommand (known: {sorted(cli.COMMANDS)})")
        if not argv:  # a mention in prose, e.g. "`python -m ssm info` prints ..."
          continue
        if command in ("train", "eval", "generate", "info"):
          _check_run_command(command, argv)
        elif command == "bench":
          _check_bench_command(argv)
      except (Exception, SystemExit) as error:  # argparse exits on a bad flag
        problems.append(f"`python -m ssm {command}{rest}`: {type(error).__name__}: {error}")
    if not commands:  # flags outside a command: each snippet's flags are applied together
      flags = _FLAG.findall(code)
      if flags:
        try:
          _check_flags(flags)
        except Exception as error:  # pylint: disable=broad-except
          problems.append(f"`{code.strip()}`: {type(error).__name__}: {error}")
    stripped = code.strip()
    field = _FIELD.match(stripped)
    if field and not _has_field(field.group(1)):
      problems.append(f"`{stripped}` is not a config field")
    for path in _REPO_PATH.findall(code):
      if not (ROOT / path.split(":")[0]).exists():
        problems.append(f"`{path}` does not exist in the repository")
    for target in _MAKE.findall(code):
      if target not in makefile_targets:
        problems.append(f"`make {target}` is not a Makefile target")
    if re.fullmatch(r"ssm(\.\w+)+", stripped):
      try:
        importlib.import_module(stripped)
      except ImportError as error:
        problems.append(f"`{stripped}`: {error}")
  return problems


def test_guide_names_only_what_exists():
  text = GUIDE.read_text()
  assert text.count("python -m ssm") >= 8, "the guide lost its commands?"
  problems = guide_problems(text)
  assert not problems, "TPU_SETUP.md:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet, expected", [
    ("```bash\npython -m ssm trian --config experiments/lra/listops.py\n```", "no such subcommand"),
    ("```bash\npython -m ssm train --config experiments/lra/nope.py\n```", "does not exist"),
    ("```bash\npython -m ssm train --config experiments/lra/listops.py:huge\n```", "huge"),
    ("```bash\npython -m ssm train --config experiments/lra/listops.py \\\n"
     "    --config.train.checkpoint_every=-1\n```", "train.checkpoint_every"),
    ("```bash\npython -m ssm train --config experiments/lm/pg19.py --multi-host\n```",
     "SystemExit"),
    ("```bash\npython -m ssm bench --ops gated_delta flash\n```", "flash"),
    ("Set `--config.mesh.fsdp=3 --config.mesh.data=1`.", "mesh"),
    ("Set `--config.train.profile=5`.", "profile"),
    ("The field `train.bucket` holds it.", "train.bucket"),
    ("Raise `--config.data.batchsize`.", "data.batchsize"),
    ("Run `make tests`.", "make tests"),
    ("```bash\ncd repo && make demos\n```", "make demos"),
    ("See `ssm.shard`.", "ssm.shard"),
])
def test_checker_catches_what_does_not_exist(snippet, expected):
  problems = guide_problems(snippet)
  assert any(expected in problem for problem in problems), problems
