"""The config schema: defaults, loading `experiments/*.py` files, and validation with clear errors.

A config is an `ml_collections.ConfigDict` with five sections, each filled from `default_config()` and
then overridden by an experiment file's `get_config(arg)`:

  model   the network: a pattern of mixer names repeated to `n_layers`, sizes, norms, head
  data    the task `data.name` and its settings: the common fields and the task's own
          (`ssm.data.tasks`; setting data.name swaps in that task's fields with their defaults)
  optim   AdamW with an SSM parameter group, warmup + cosine, clipping
  mesh    the device mesh: sizes of the data / fsdp / tensor / seq axes (`ssm.sharding`)
  train   steps, gradient accumulation, evaluation, logging and checkpoint cadence

`validate(config, num_devices)` runs before anything is compiled; every error names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib

import ml_collections

from layers import blocks

TASKS = ("classify", "retrieval", "lm")
INPUTS = ("tokens", "continuous")
POOLS = ("mean", "last")
NORMS = ("layer", "rms")
MLP_ACTIVATIONS = ("swiglu", "geglu")
SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
  """A config field has a bad value; the message starts with the field's dotted name."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config field '{field}': {message}")
    self.field = field


def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the defaults an experiment file overrides."""
  c = ml_collections.ConfigDict()
  c.name = "unnamed"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.task = "classify"  # classify | retrieval (two-tower, pairs of sequences) | lm
  c.model.input = "tokens"  # tokens (embedding table) | continuous (linear encoder)
  c.model.d_input = 1  # feature size of continuous inputs
  c.model.vocab_size = 0  # token vocabulary of the embedding / LM head; 0: the task's
  c.model.tie_embeddings = False  # LM head = the token embedding table, transposed
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.pattern = "s4d"  # comma-separated pattern entries (one group), repeated to n_layers
  # Per-entry settings: the mixer's keyword arguments (e.g. mixers.s4d.d_state), plus two reserved
  # keys: `type` (the registry mixer an entry names, default the entry itself, so that e.g.
  # "swa" and "global_attn" can both be attention) and `mlp_ratio` (overrides model.mlp_ratio).
  c.model.mixers = ml_collections.ConfigDict()
  c.model.norm = "layer"
  c.model.prenorm = True
  c.model.dropout = 0.0
  c.model.mlp_ratio = 0.0  # MLP hidden size / d_model (a float); 0: no MLP sub-block after the mixer
  c.model.mlp_activation = "swiglu"
  c.model.pool = "mean"  # classifier pooling over real (unpadded) tokens
  c.model.dtype = "float32"  # compute dtype of the blocks: float32 | bfloat16 (parameters: float32)
  c.model.scan_layers = True  # repeated groups under nn.scan: compile time flat in depth
  c.model.remat = "none"  # none | full | dots | dots_no_batch: checkpoint policy of each group

  # The common data fields plus the settings of the task data.name names (ssm.data.tasks);
  # setting data.name (in build / merge / an override) swaps in that task's settings.
  c.data = data_section("lra_listops")

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.ssm_lr = 1e-3  # learning rate of the mixers' `ssm_param_names` (A, B, log dt ...)
  c.optim.weight_decay = 0.01  # not applied to SSM parameters, biases and norm scales
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0  # global norm; 0 disables
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"

  c.mesh = ml_collections.ConfigDict()  # device mesh (ssm.sharding): one axis may be -1 = the rest
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.seq = 1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1_000
  c.train.grad_accum = 1  # microbatches per step: the gradient of the whole batch, in k passes
  c.train.log_every = 50
  c.train.eval_every = 500  # 0: evaluate only at the end
  c.train.checkpoint_every = 500  # 0: no checkpoints
  c.train.keep_checkpoints = 3
  # Where checkpoints go: "" = <workdir>/checkpoints; or any path orbax can write, e.g. a bucket
  # (gs://bucket/run), which a multi-host run needs: every host writes its shards there.
  c.train.checkpoint_dir = ""
  # Trace `profile_steps` train steps from step `profile_start` (after compilation) into
  # <workdir>/profile (TensorBoard / XProf); 0 steps: no trace.
  c.train.profile_start = 10
  c.train.profile_steps = 0
  c.train.progress_bar = True
  # LM tasks over a corpus stream: after training, the per-position validation loss at these
  # multiples of data.seq_len (e.g. (2, 4, 8)), on `extrapolation_examples` windows each.
  c.train.extrapolation = ()
  c.train.extrapolation_examples = 64
  return c


def data_section(task: str, keep: ml_collections.ConfigDict | None = None
                 ) -> ml_collections.ConfigDict:
  """The `data` section of `task`: its fields and defaults (`ssm.data.tasks.task_fields`), with
  the common fields' values taken from `keep` (the section it replaces) when given."""
  from ssm.data import tasks  # here: ssm.data imports this module
  fields = tasks.task_fields(task)
  if keep is not None:
    fields.update({k: keep[k] for k in tasks.COMMON_FIELDS if k in keep and k != "name"})
  return ml_collections.ConfigDict(fields)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`: calls the file's `get_config(arg)` and merges it over `default_config()`."""
  file_path, _, arg = path.partition(":")
  p = pathlib.Path(file_path)
  if not p.is_file():
    raise FileNotFoundError(f"config file not found: {file_path}")
  spec = importlib.util.spec_from_file_location(f"_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {file_path} defines no get_config()")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"{file_path}: get_config() must return a ConfigDict (use ssm.config.build), "
                    f"got {type(config).__name__}")
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies command-line overrides `section.field=value` (value parsed as a Python literal, else a string)."""
  for item in overrides:
    field, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(field, f"override {item!r} is not of the form field=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if field == "data.name":
      merge(config, {"data": {"name": value}})
      continue
    *parents, key = field.split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node:
        if ".".join(parents[:i]) != "model.mixers":
          raise ConfigError(".".join(parents[: i + 1]), "unknown section")
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    if key not in node and not field.startswith("model.mixers."):
      raise ConfigError(field, f"unknown field (known: {', '.join(sorted(node.keys()))})")
    if isinstance(value, int) and isinstance(node.get(key), float):
      value = float(value)
    try:
      node[key] = value
    except TypeError as e:
      raise ConfigError(field, f"cannot set {value!r}: {e}") from None
  return config


def merge(base: ml_collections.ConfigDict, overrides: dict, prefix: str = "") -> ml_collections.ConfigDict:
  """Recursively sets `overrides` on `base`; an unknown field is an error (typos never pass silently).

  `model.mixers` is open: it holds the keyword arguments of whichever mixers the pattern names.
  """
  if prefix == "data." and "name" in overrides and overrides["name"] != base.get("name"):
    swapped = data_section(overrides["name"], keep=base)
    for k in list(base.keys()):
      del base[k]
    base.update(swapped)
  for key, value in overrides.items():
    field = f"{prefix}{key}"
    if key not in base:
      if not prefix.startswith("model.mixers."):
        raise ConfigError(field, f"unknown field (known: {', '.join(sorted(base.keys()))})")
      base[key] = ml_collections.ConfigDict() if isinstance(value, dict) else value
    if isinstance(base[key], ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(field, f"expected a section (dict), got {value!r}")
      merge(base[key], dict(value), prefix=f"{field}.")
    else:
      base[key] = value
  return base


def build(**sections) -> ml_collections.ConfigDict:
  """`default_config()` with the given sections/fields merged in; what an experiment's get_config returns."""
  return merge(default_config(), sections)


RESERVED_ENTRY_KEYS = ("type", "mlp_ratio")


def pattern_entries(model_cfg) -> tuple[str, ...]:
  """The entries of one group, in order: `model.pattern` split at commas."""
  return tuple(n.strip() for n in str(model_cfg.pattern).split(","))


def mixer_type(model_cfg, entry: str) -> str:
  """The registry mixer a pattern entry names: `model.mixers.<entry>.type`, else the entry."""
  settings = model_cfg.mixers.get(entry)
  return settings.get("type", entry) if settings is not None else entry


def pattern_of(model_cfg) -> tuple[str, ...]:
  """The mixer type of every layer: the group's entries repeated to `model.n_layers`."""
  types = tuple(mixer_type(model_cfg, e) for e in pattern_entries(model_cfg))
  return types * (model_cfg.n_layers // max(len(types), 1))



def _check(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def _one_of(value, choices, field):
  _check(value in choices, field, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def _positive_int(value, field):
  _check(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first bad field. Nothing is compiled or loaded here."""
  m, d, o, t = config.model, config.data, config.optim, config.train
  _one_of(m.task, TASKS, "model.task")
  _one_of(m.input, INPUTS, "model.input")
  _one_of(m.pool, POOLS, "model.pool")
  _one_of(m.norm, NORMS, "model.norm")
  _one_of(m.mlp_activation, MLP_ACTIVATIONS, "model.mlp_activation")
  _positive_int(m.d_model, "model.d_model")
  _positive_int(m.n_layers, "model.n_layers")
  _positive_int(m.d_input, "model.d_input")
  _check(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  _check(isinstance(m.mlp_ratio, (int, float)) and m.mlp_ratio >= 0, "model.mlp_ratio",
         f"must be a number >= 0, got {m.mlp_ratio!r}")
  _check(m.task != "retrieval" or m.input == "tokens", "model.input",
         "the two-tower retrieval head reads token pairs (model.input 'tokens')")
  _check(not m.tie_embeddings or (m.task == "lm" and m.input == "tokens"), "model.tie_embeddings",
         "needs an LM (model.task 'lm') over token inputs (model.input 'tokens')")
  _check(isinstance(m.vocab_size, int) and m.vocab_size >= 0, "model.vocab_size",
         f"must be an integer >= 0 (0: the task's vocabulary), got {m.vocab_size!r}")

  _one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
  _check(isinstance(m.scan_layers, bool), "model.scan_layers", f"must be True or False, got {m.scan_layers!r}")
  _one_of(m.remat, ("none", "full", "dots", "dots_no_batch"), "model.remat")

  names = pattern_entries(m)
  _check(all(names), "model.pattern", f"empty entry in {m.pattern!r}")
  for name in names:
    _check(mixer_type(m, name) in blocks.mixer_names(), "model.pattern" if name not in m.mixers
           else f"model.mixers.{name}.type",
           f"unknown mixer {mixer_type(m, name)!r} (known: {', '.join(blocks.mixer_names())})")
  _check(m.n_layers % len(names) == 0, "model.n_layers",
         f"{m.n_layers} layers cannot repeat the pattern {m.pattern!r} of {len(names)} mixers evenly")
  for name, kwargs in m.mixers.items():
    _check(name in names, f"model.mixers.{name}", f"settings for a mixer the pattern {m.pattern!r} does not use")
    cls = blocks.get_mixer(mixer_type(m, name))
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "d_model"}
    for key in kwargs.keys():
      _check(key in fields or key in RESERVED_ENTRY_KEYS, f"model.mixers.{name}.{key}",
             f"{cls.__name__} has no such argument (known: {', '.join(sorted(fields))}; "
             f"and the entry settings {', '.join(RESERVED_ENTRY_KEYS)})")
    if "mlp_ratio" in kwargs:
      ratio = kwargs["mlp_ratio"]
      _check(isinstance(ratio, (int, float)) and ratio >= 0, f"model.mixers.{name}.mlp_ratio",
             f"must be >= 0, got {ratio!r}")
  if m.task == "lm":  # each position predicts the next token: no mixer may read ahead
    for name in names:
      cls = blocks.get_mixer(mixer_type(m, name))
      defaults = {f.name: f.default for f in dataclasses.fields(cls)}
      kwargs = m.mixers.get(name, {})
      for key, reads_ahead in (("bidirectional", True), ("causal", False)):
        _check(key not in defaults or kwargs.get(key, defaults[key]) != reads_ahead,
               f"model.mixers.{name}.{key}", f"{key}={reads_ahead} reads later tokens, which a "
               "language model (model.task 'lm') predicts; use it in classifiers")

  _positive_int(d.seq_len, "data.seq_len")
  _positive_int(d.batch_size, "data.batch_size")
  _positive_int(d.eval_batch_size, "data.eval_batch_size")
  from ssm import sharding  # imported here: ssm.sharding imports this module
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  batch_ways = mesh["data"] * mesh["fsdp"]
  _positive_int(t.grad_accum, "train.grad_accum")
  _check(d.batch_size % (batch_ways * t.grad_accum) == 0, "data.batch_size",
         f"{d.batch_size} does not divide over the {batch_ways} devices of the data x fsdp mesh axes"
         + (f" times {t.grad_accum} microbatches (train.grad_accum)" if t.grad_accum > 1 else ""))
  _check(d.eval_batch_size % batch_ways == 0, "data.eval_batch_size",
         f"{d.eval_batch_size} does not divide over the {batch_ways} devices of the data x fsdp mesh axes")
  _check(d.seq_len % mesh["seq"] == 0, "data.seq_len",
         f"{d.seq_len} does not divide over the {mesh['seq']} devices of the seq mesh axis")

  for field in ("lr", "ssm_lr", "weight_decay", "grad_clip"):
    value = o[field]
    _check(isinstance(value, (int, float)) and value >= 0, f"optim.{field}", f"must be >= 0, got {value!r}")
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", f"Adam betas must be in [0, 1), got {o.b1}, {o.b2}")
  _one_of(o.schedule, SCHEDULES, "optim.schedule")
  _check(isinstance(o.warmup_steps, int) and 0 <= o.warmup_steps < t.num_steps, "optim.warmup_steps",
         f"must be in [0, train.num_steps={t.num_steps}), got {o.warmup_steps!r}")

  _positive_int(t.num_steps, "train.num_steps")
  _positive_int(t.log_every, "train.log_every")
  _positive_int(t.keep_checkpoints, "train.keep_checkpoints")
  _check(isinstance(t.checkpoint_dir, str), "train.checkpoint_dir",
         f"must be a path or URL string ('' for <workdir>/checkpoints), got {t.checkpoint_dir!r}")
  for field in ("eval_every", "checkpoint_every", "profile_start", "profile_steps"):
    value = t[field]
    _check(isinstance(value, int) and value >= 0, f"train.{field}", f"must be >= 0, got {value!r}")
