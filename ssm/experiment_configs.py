"""Builders the experiment files share (`experiments/**/*.py`): the LRA model recipes of S4 and S5,
the byte-level LM recipe, and presets.

Each experiment file keeps its published numbers in plain sight and calls these to assemble the
config; what the recipes cannot reproduce exactly is listed in `LRA_DEVIATIONS`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ssm import config as config_lib
from ssm import presets

LRA_DEVIATIONS = """Deviations from the published setups, everywhere: LayerNorm instead of
BatchNorm (the codebase has no BatchNorm); the reported result is the final parameters' test
accuracy, not that of the checkpoint with the best validation accuracy; the S5 variants use this
codebase's AdamW groups (SSM parameters at the SSM learning rate without weight decay, the rest
at lr) rather than S5's per-matrix optimizer configs ("BfastandCdecay" etc.)."""


def steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """Optimizer steps of `epochs` passes over `num_examples` at `batch_size`."""
  return int(math.ceil(epochs * num_examples / batch_size))


def lra_s4(*, name: str, data: dict[str, Any], n_layers: int, d_model: int, d_state: int,
           prenorm: bool, dropout: float, batch_size: int, lr: float, ssm_lr: float,
           weight_decay: float, num_steps: int, warmup_steps: int, dt_min: float = 1e-3,
           dt_max: float = 1e-1, n_ssm: int | None = 1, continuous: bool = False,
           eval_every: int = 2_000) -> ml_collections.ConfigDict:
  """An S4 (DPLR, HiPPO-LegS, bidirectional, GLU output) classifier with mean pooling, as the S4
  repository's `configs/experiment/lra/s4-*.yaml`."""
  s4 = dict(d_state=d_state, measure="legs", dt_min=dt_min, dt_max=dt_max, bidirectional=True,
            n_ssm=n_ssm, dropout=dropout)
  return _lra(name, data, dict(pattern="s4", mixers=dict(s4=s4)), n_layers=n_layers,
              d_model=d_model, prenorm=prenorm, dropout=dropout, batch_size=batch_size, lr=lr,
              ssm_lr=ssm_lr, weight_decay=weight_decay, num_steps=num_steps,
              warmup_steps=warmup_steps, continuous=continuous, eval_every=eval_every)


def lra_s5(*, name: str, data: dict[str, Any], n_layers: int, d_model: int, d_state: int,
           blocks: int, c_init: str, dropout: float, batch_size: int, lr: float, ssm_lr: float,
           weight_decay: float, num_steps: int, warmup_steps: int, dt_min: float = 1e-3,
           prenorm: bool = False, continuous: bool = False,
           eval_every: int = 2_000) -> ml_collections.ConfigDict:
  """An S5 (one MIMO SSM of P = d_state states, block-diagonal HiPPO init with `blocks` blocks,
  bidirectional) classifier with mean pooling, as S5's `bin/run_experiments/run_lra_*.sh`
  (lr = ssm_lr_base x lr_factor)."""
  s5 = dict(d_state=d_state, blocks=blocks, c_init=c_init, dt_min=dt_min, bidirectional=True,
            dropout=dropout)
  return _lra(name, data, dict(pattern="s5", mixers=dict(s5=s5)), n_layers=n_layers,
              d_model=d_model, prenorm=prenorm, dropout=dropout, batch_size=batch_size, lr=lr,
              ssm_lr=ssm_lr, weight_decay=weight_decay, num_steps=num_steps,
              warmup_steps=warmup_steps, continuous=continuous, eval_every=eval_every)


def _lra(name, data, mixer, *, n_layers, d_model, prenorm, dropout, batch_size, lr, ssm_lr,
         weight_decay, num_steps, warmup_steps, continuous, eval_every):
  inputs = dict(input="continuous", d_input=1) if continuous else dict(input="tokens")
  return config_lib.build(
      name=name,
      model=dict(task="retrieval" if data["name"] == "lra_retrieval" else "classify", **inputs,
                 d_model=d_model, n_layers=n_layers, norm="layer", prenorm=prenorm,
                 dropout=dropout, pool="mean", **mixer),
      data=dict(data, batch_size=batch_size, eval_batch_size=batch_size,
                **(dict(pixels="continuous") if continuous else {})),
      optim=dict(lr=lr, ssm_lr=ssm_lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                 schedule="cosine", grad_clip=0.0),
      train=dict(num_steps=num_steps, log_every=100, eval_every=eval_every,
                 checkpoint_every=eval_every))


def cpu_preset(config: ml_collections.ConfigDict, *, data: dict[str, Any], num_steps: int = 400,
               d_model: int = 32, n_layers: int = 2, lr: float = 3e-3,
               batch_size: int = 16) -> ml_collections.ConfigDict:
  """A laptop-sized version of an LRA config: an S4D stack (the fastest S4-family mixer on a CPU)
  of `n_layers` x `d_model`, with the task's data settings replaced by `data` (shorter, fewer)."""
  config.model.mixers = ml_collections.ConfigDict(
      dict(s4d=dict(d_state=16, dt_min=1e-3, dt_max=1e-1, bidirectional=True)))
  return config_lib.merge(config, dict(
      model=dict(d_model=d_model, n_layers=n_layers, dropout=0.0, pattern="s4d"),
      data=dict(data, batch_size=batch_size, eval_batch_size=64),
      optim=dict(lr=lr, ssm_lr=min(lr, 1e-3), warmup_steps=max(1, num_steps // 10),
                 weight_decay=0.01),
      train=dict(num_steps=num_steps, log_every=max(1, num_steps // 20),
                 eval_every=max(1, num_steps // 4), checkpoint_every=max(1, num_steps // 2))))


def select(path: str, preset: str | None, options: dict[str | None, Any]
           ) -> ml_collections.ConfigDict:
  """`options[preset]()`: an experiment file's presets by name (None: the default)."""
  if preset not in options:
    known = ", ".join(k for k in options if k is not None)
    raise ValueError(f"unknown preset {preset!r} for {path} (known: {known})")
  return options[preset]()


def byte_lm(*, name: str, data: dict[str, Any], preset: str | None, seq_len: int = 2048,
            extrapolation: tuple[int, ...] = (2, 4, 8)) -> ml_collections.ConfigDict:
  """A byte-level LM: the model preset `preset` ("<name>-<size>" of ssm.presets, default
  "gdn_h1-125m") over the task's 258-token byte vocabulary, trained on windows of `seq_len`
  bytes and evaluated at the `extrapolation` multiples of it afterwards. Attention and Hyena
  position limits are raised to the longest evaluated length."""
  model_name, _, size = (preset or "gdn_h1-125m").rpartition("-")
  if not model_name:
    raise ValueError(f"preset {preset!r}: expected <model>-<size>, e.g. mamba-125m (models: "
                     f"{', '.join(presets.PRESETS)}; sizes: {', '.join(presets.SIZES)})")
  model = presets.model_preset(model_name, size)
  longest = seq_len * max((1,) + tuple(extrapolation))
  for settings in model["mixers"].values():
    if settings.get("type") in ("attention", "hyena"):
      settings["max_length"] = longest
  model["vocab_size"] = 0  # the task's byte vocabulary
  tiny = size == "tiny"
  return config_lib.build(
      name=f"{name}_{model_name}_{size}", model=model,
      data=dict(data, seq_len=seq_len, batch_size=8 if tiny else 32,
                eval_batch_size=8 if tiny else 32, eval_examples=64 if tiny else 512),
      optim=dict(lr=3e-3 if tiny else 6e-4, ssm_lr=3e-3 if tiny else 6e-4, weight_decay=0.1,
                 b2=0.95, warmup_steps=20 if tiny else 2_000, grad_clip=1.0),
      train=dict(num_steps=200 if tiny else 100_000, log_every=10 if tiny else 100,
                 eval_every=100 if tiny else 2_000, checkpoint_every=100 if tiny else 2_000,
                 extrapolation=tuple(extrapolation),
                 extrapolation_examples=8 if tiny else 64))


def recall_mixers(d_model: int, length: int) -> dict[str, tuple[str, dict[str, Any]]]:
  """The sequence mixers compared on the recall tasks, as (pattern, model.mixers): each in a
  Zoology-style block (mixer + MLP), sized for `d_model` and sequences of `length`."""
  heads = max(1, d_model // 64)
  return {
      "attention": ("attn", dict(attn=dict(type="attention", num_heads=heads,
                                           max_length=length, block_size=min(64, length)))),
      "swa": ("swa", dict(swa=dict(type="attention", num_heads=heads, window=length // 4,
                                   block_size=min(64, length)))),
      "mamba": ("mamba", dict(mamba=dict(d_state=16, expand=2))),
      "mamba2": ("mamba2", dict(mamba2=dict(d_state=64, headdim=min(64, d_model), expand=2))),
      "gated_deltanet": ("gdn", dict(gdn=dict(type="gated_deltanet", num_heads=heads,
                                              head_dim_k=min(64, d_model)))),
      "hyena": ("hyena", dict(hyena=dict(max_length=length, filter_order=64))),
      "s4d": ("s4d", dict(s4d=dict(d_state=64))),
  }


def recall(*, name: str, data: dict[str, Any], mixer: str, length: int, d_model: int = 128,
           n_layers: int = 2, lr: float = 1e-3, batch_size: int = 64,
           num_steps: int = 10_000) -> ml_collections.ConfigDict:
  """A recall-task LM: `n_layers` pre-norm blocks of `mixer` (a key of `recall_mixers`) + a
  SwiGLU MLP (ratio 2), trained on the per-position targets of the task."""
  mixers = recall_mixers(d_model, length)
  if mixer not in mixers:
    raise ValueError(f"unknown recall mixer {mixer!r} (known: {', '.join(mixers)})")
  pattern, settings = mixers[mixer]
  return config_lib.build(
      name=f"{name}_{mixer}_d{d_model}_lr{lr:g}",
      model=dict(task="lm", input="tokens", d_model=d_model, n_layers=n_layers, pattern=pattern,
                 mixers=settings, norm="rms", prenorm=True, mlp_ratio=2.0),
      data=dict(data, seq_len=length, batch_size=batch_size, eval_batch_size=256),
      optim=dict(lr=lr, ssm_lr=lr, weight_decay=0.1, warmup_steps=num_steps // 20),
      train=dict(num_steps=num_steps, log_every=100, eval_every=1_000,
                 checkpoint_every=num_steps))
