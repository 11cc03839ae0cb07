"""Command line: `python -m ssm train|eval|bench ...`.

  python -m ssm train --config experiments/lra/listops.py[:preset] [--workdir DIR] [--config.a.b=value ...]
  python -m ssm eval  --config ... --workdir DIR [--split test]     (evaluates the newest checkpoint)
  python -m ssm info  --config ... [--num-outputs N] [--config.a.b=value ...]  (layer table, parameter counts)
  python -m ssm generate --config ... --workdir DIR --prompt-tokens 1,2,3 [--max-new-tokens 32]
                     [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--random-init]
  python -m ssm bench [--ops scan] [--lengths ...]                   (see `python -m ssm bench --help`)
  python -m ssm report RUN_DIR [RUN_DIR ...] [--out DIR] [--skip-bad] (results table and plots)
  python -m ssm tasks                                                (the data tasks and their settings)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _parse_run_args(command: str, argv: list[str]):
  parser = argparse.ArgumentParser(prog=f"python -m ssm {command}")
  parser.add_argument("--config", required=True, help="experiment file, optionally with :preset")
  parser.add_argument("--workdir", help="where checkpoints, metrics and plots go (default runs/<name>[_<preset>])")
  parser.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
  if command == "eval":
    parser.add_argument("--split", default="test")
  if command == "generate":
    parser.add_argument("--prompt-tokens", required=True,
                        help="the prompt as comma-separated token ids (one sequence)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--random-init", action="store_true",
                        help="use the config's initial parameters instead of a checkpoint")
  if command == "info":
    parser.add_argument("--num-outputs", type=int, default=None,
                        help="classes of a classifier (default: from the task, which may build it)")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r} (overrides look like --config.model.d_model=256)")
    overrides.append(item[len("--config."):])
  return args, overrides


def _setup(args, overrides):
  import jax
  import tensorflow_datasets as tfds

  from ssm import config as config_lib
  from ssm.data import tasks
  if args.multihost:
    jax.distributed.initialize()
  tfds.disable_progress_bar()
  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
  config_lib.validate(config, num_devices=jax.device_count())
  preset = args.config.partition(":")[2]
  workdir = pathlib.Path(args.workdir or f"runs/{config.name}{'_' + preset if preset else ''}")
  task = tasks.load_task(config.data, seed=config.seed)
  return config, task, workdir


def train(argv: list[str]) -> int:
  args, overrides = _parse_run_args("train", argv)
  config, task, workdir = _setup(args, overrides)
  from ssm import metrics, train as train_lib
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  print(f"config {args.config} -> {workdir}")
  result = train_lib.Trainer(config, task).run(workdir)
  if "test" in result:
    acc, majority = result["test"]["accuracy"], result.get("majority_rate")
    line = f"test accuracy {acc:.4f}"
    if majority is not None:
      line += f" (majority-class rate {majority:.4f})"
    print(line)
    summary = {"step": result["step"], "validation": result["validation"], "test": result["test"],
               "majority_rate": majority}
    (workdir / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"curves: {metrics.plot_curves(workdir, majority_rate=majority)}")
  return 0


def evaluate(argv: list[str]) -> int:
  args, overrides = _parse_run_args("eval", argv)
  config, task, workdir = _setup(args, overrides)
  from ssm import checkpoint, train as train_lib
  trainer = train_lib.Trainer(config, task)
  state = trainer.init_state(next(iter(task.eval_batches("validation"))))
  ckpt_dir = checkpoint.checkpoint_dir(config.train, workdir)
  restored = checkpoint.Checkpointer(ckpt_dir, every=0).restore(state)
  if restored is None:
    print(f"no checkpoint in {ckpt_dir}", file=sys.stderr)
    return 1
  state, _, step = restored
  print(json.dumps({"step": step, "split": args.split, **trainer.evaluate(state.params, args.split)}))
  return 0


def generate(argv: list[str]) -> int:
  args, overrides = _parse_run_args("generate", argv)
  config, task, workdir = _setup(args, overrides)
  import jax
  import numpy as np
  from ssm import checkpoint, generate as generate_lib, train as train_lib
  if config.model.task != "lm":
    print(f"generate needs an LM config (model.task 'lm'), got {config.model.task!r}", file=sys.stderr)
    return 2
  try:
    prompt = np.asarray([[int(t) for t in args.prompt_tokens.split(",") if t.strip()]], np.int32)
  except ValueError:
    print(f"--prompt-tokens: expected comma-separated integers, got {args.prompt_tokens!r}",
          file=sys.stderr)
    return 2
  trainer = train_lib.Trainer(config, task)
  vocab = trainer.eval_model.vocab_size
  if prompt.size == 0 or prompt.min() < 0 or prompt.max() >= vocab:
    print(f"--prompt-tokens: need at least one token, each in [0, {vocab})", file=sys.stderr)
    return 2
  batch = {"tokens": prompt, "mask": np.ones(prompt.shape, bool)}
  state = trainer.init_state(batch)
  step = 0
  if not args.random_init:
    ckpt_dir = checkpoint.checkpoint_dir(config.train, workdir)
    restored = checkpoint.Checkpointer(ckpt_dir, every=0).restore(state)
    if restored is None:
      print(f"no checkpoint in {ckpt_dir} (pass --random-init to sample from the "
            "initial parameters)", file=sys.stderr)
      return 1
    state, _, step = restored
  tokens = generate_lib.generate(
      trainer.eval_model, {"params": state.params}, prompt, jax.random.key(args.seed),
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p)
  print(json.dumps({"step": step, "prompt": prompt[0].tolist(),
                    "generated": np.asarray(tokens)[0, prompt.shape[1]:].tolist()}))
  return 0


def info(argv: list[str]) -> int:
  args, overrides = _parse_run_args("info", argv)
  from ssm import config as config_lib, info as info_lib
  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
  config_lib.validate(config)
  vocab = config.model.vocab_size
  num_outputs = vocab if config.model.task == "lm" else args.num_outputs
  if (config.model.input == "tokens" and not vocab) or not num_outputs:
    from ssm.data import tasks
    task = tasks.load_task(config.data, seed=config.seed)
    vocab = vocab or task.vocab_size
    num_outputs = num_outputs or (vocab if config.model.task == "lm" else task.num_classes)
  print(info_lib.describe(config, num_outputs=num_outputs,
                          vocab_size=vocab if config.model.input == "tokens" else 0))
  return 0


def bench(argv: list[str]) -> int:
  from ssm import bench as bench_lib
  return bench_lib.main(argv)


def report(argv: list[str]) -> int:
  from ssm import report as report_lib
  return report_lib.main(argv)


def list_tasks(argv: list[str]) -> int:
  if argv:
    print("usage: python -m ssm tasks", file=sys.stderr)
    return 2
  from ssm.data import tasks
  for name, spec in sorted(tasks.task_specs().items()):
    settings = ", ".join(f"{k}={v!r}" for k, v in spec.fields.items()) or "none"
    print(f"{name} ({spec.kind}): {spec.description}\n    settings: {settings}")
  return 0


COMMANDS = {"train": train, "eval": evaluate, "generate": generate, "info": info, "bench": bench,
            "report": report, "tasks": list_tasks}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in COMMANDS:
    print(__doc__, file=sys.stderr)
    return 2
  return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
