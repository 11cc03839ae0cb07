"""Training: the train state, AdamW with an SSM parameter group, the sharded train/eval steps, the loop.

The steps are `jax.jit`-compiled with `NamedSharding`s over the config's mesh (`ssm.sharding`): the
batch is split over data x fsdp, parameters and optimizer state are created sharded by the
logical-axis rules (no single-device copy first), and XLA inserts the collectives. On a mesh with
a `seq` axis the length is split over it too and the model runs sequence-parallel
(`ssm.sequence_parallel`). Loss and metrics are means over the global batch, so a step gives the
same result on any mesh. With `train.grad_accum = k` the batch runs as k microbatches whose summed gradients make
exactly the gradient of the whole batch.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssm import checkpoint as checkpoint_lib
from ssm import config as config_lib
from ssm import metrics as metrics_lib
from ssm import model as model_lib
from ssm import sequence_parallel
from ssm import sharding as sharding_lib
from ssm.data import tasks


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of batches consumed (applied or skipped)
  params: Any
  opt_state: Any
  skipped: jax.Array  # steps whose loss or gradient was not finite, so not applied


def learning_rate_schedule(peak: float, optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine to 0 at `num_steps` (or constant)."""
  warmup = optim_cfg.warmup_steps
  if optim_cfg.schedule == "constant":
    return optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps, end_value=0.0)


def param_groups(params, ssm_names: frozenset[str]):
  """Labels each parameter: "ssm" (its name, or the name of a submodule holding it, is one of the
  mixers' `ssm_param_names`: A, dt, a Hyena filter ...), "no_decay" (biases, norm scales: rank < 2)
  or "decay"."""

  def label(path, leaf):
    names = [p.key if hasattr(p, "key") else str(p) for p in path]
    if any(name in ssm_names for name in names):
      return "ssm"
    return "decay" if leaf.ndim >= 2 else "no_decay"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim_cfg, num_steps: int, params, ssm_names: frozenset[str]) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW per group: SSM parameters get `ssm_lr` and no weight decay."""

  def adamw(lr, wd):
    return optax.adamw(learning_rate_schedule(lr, optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                       weight_decay=wd)

  groups = optax.multi_transform(
      {"decay": adamw(optim_cfg.lr, optim_cfg.weight_decay), "no_decay": adamw(optim_cfg.lr, 0.0),
       "ssm": adamw(optim_cfg.ssm_lr, 0.0)},
      param_groups(params, ssm_names))
  if optim_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), groups)
  return groups


def classification_loss(logits, labels, weights):
  """Summed cross-entropy, correct count and weight; logits [batch, classes], labels/weights [batch]."""
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_sum": (nll * weights).sum(), "correct": (correct * weights).sum(),
          "weight": weights.sum()}


def lm_targets(batch) -> tuple[jax.Array, jax.Array]:
  """(targets, weights) [batch, length] of an LM batch: the position-t target is batch["targets"]
  [t] where the task gives targets (IGNORE_INDEX: none), else the next token tokens[t + 1] while
  it is real. Weights are 0 where there is no target and on eval-filler examples."""
  if "targets" in batch:
    targets, weights = batch["targets"], batch["targets"] >= 0
  else:
    tokens, mask = batch["tokens"], batch["mask"]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    weights = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  weights = weights.astype(jnp.float32)
  if "weight" in batch:
    weights = weights * batch["weight"][:, None]
  return jnp.maximum(targets, 0), weights


def token_losses(logits, targets):
  """Cross-entropy and correctness per position: logits [batch, length, vocab], targets
  [batch, length] -> two float32 [batch, length]."""
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll, (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


def lm_loss(logits, batch):
  """Cross-entropy summed over the targets of `lm_targets`; returns the sums as
  `classification_loss` does (accuracy: of the argmax over those targets)."""
  targets, weights = lm_targets(batch)
  nll, correct = token_losses(logits, targets)
  return {"loss_sum": (nll * weights).sum(), "correct": (correct * weights).sum(),
          "weight": weights.sum()}


def model_logits(model: nn.Module, params, batch, rng, mesh: Mesh | None = None):
  """The model's outputs on a batch; a model with a `seq_axis` runs sequence-parallel over that
  axis of `mesh`."""
  if model.seq_axis is not None:
    return sequence_parallel.model_apply(model, {"params": params}, batch["tokens"], mesh=mesh,
                                         mask=batch["mask"], rngs={"dropout": rng})
  return model.apply({"params": params}, batch["tokens"], mask=batch["mask"],
                     rngs={"dropout": rng})[0]


def compute_sums(model: nn.Module, params, batch, rng, mesh: Mesh | None = None):
  """{"loss_sum", "correct", "weight"} of a batch (float32)."""
  logits = model_logits(model, params, batch, rng, mesh)
  if model.head == "lm":
    return lm_loss(logits, batch)
  return classification_loss(logits, batch["label"], batch["weight"])


def make_position_loss_step(model: nn.Module, mesh: Mesh | None = None) -> Callable:
  """(params, batch) -> {"loss_sum", "weight"} float32 [length]: the summed cross-entropy and
  target count at each position over the batch (for loss-by-position curves)."""

  def position_loss_step(params, batch):
    targets, weights = lm_targets(batch)
    logits = model_logits(model, params, batch, jax.random.PRNGKey(0), mesh)
    nll, _ = token_losses(logits, targets)
    return {"loss_sum": (nll * weights).sum(0), "weight": weights.sum(0)}

  return position_loss_step


def microbatches(batch, k: int):
  """[batch, ...] arrays -> [k, batch/k, ...]; microbatch i takes rows i, i+k, ... so that each
  device's share of the batch splits evenly (a device holds contiguous rows)."""
  return jax.tree.map(lambda a: a.reshape((a.shape[0] // k, k) + a.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, seed: int,
                    grad_accum: int = 1, mesh: Mesh | None = None) -> Callable:
  """(state, batch) -> (state, metrics). The loss is the weighted mean over the whole batch, its
  gradient summed over `grad_accum` microbatches. A non-finite loss or gradient leaves params and
  optimizer state unchanged, counts in `state.skipped`, and is reported in the metrics."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    def loss_sum(params, batch, rng):
      sums = compute_sums(model, params, batch, rng, mesh)
      return sums["loss_sum"], sums
    grad_sums = jax.grad(loss_sum, has_aux=True)
    if grad_accum == 1:
      grads, sums = grad_sums(state.params, batch, rng)
    else:
      def accumulate(carry, micro):
        i, micro_batch = micro
        g, s = grad_sums(state.params, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "weight")})
      (grads, sums), _ = jax.lax.scan(accumulate, init,
                                      (jnp.arange(grad_accum), microbatches(batch, grad_accum)))
    total = jnp.maximum(sums["weight"], 1e-9)
    loss = sums["loss_sum"] / total
    grads = jax.tree.map(lambda g: g / total, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = TrainState(step=state.step + 1, params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state),
                       skipped=state.skipped + (~finite).astype(jnp.int32))
    return state, {"loss": loss, "accuracy": sums["correct"] / total, "grad_norm": grad_norm,
                   "nonfinite": (~finite).astype(jnp.float32)}

  return train_step


def make_eval_step(model: nn.Module, mesh: Mesh | None = None) -> Callable:
  """(params, batch) -> summed loss, correct count and weight, to be totalled over the eval set."""

  def eval_step(params, batch):
    # The eval model is deterministic: the key draws no dropout.
    return compute_sums(model, params, batch, jax.random.PRNGKey(0), mesh)

  return eval_step


def check_task(model_cfg, task: tasks.Task) -> None:
  """ConfigError naming the model field that does not fit the task's data. An LM (model.task
  "lm") may also model the token sequences of a classification task, ignoring the labels."""
  fits = model_cfg.task == task.kind or (model_cfg.task == "lm" and task.kind == "classify")
  if not fits:
    raise config_lib.ConfigError("model.task", f"task {task.name!r} is a {task.kind!r} task, "
                                 f"got {model_cfg.task!r}")
  if task.d_input and (model_cfg.input, model_cfg.d_input) != ("continuous", task.d_input):
    raise config_lib.ConfigError(
        "model.input", f"task {task.name!r} gives float features of size {task.d_input}: set "
        f"model.input='continuous' and model.d_input={task.d_input}")
  if not task.d_input and model_cfg.input != "tokens":
    raise config_lib.ConfigError("model.input", f"task {task.name!r} gives token ids: set "
                                 "model.input='tokens'")


def lm_metrics(loss: float, unit: str) -> dict[str, float]:
  """An LM's mean cross-entropy (nats per token) as bits per token (named by the task's unit:
  bits_per_byte, bits_per_base ...) and perplexity."""
  return {f"bits_per_{unit}": loss / math.log(2), "perplexity": math.exp(min(loss, 700.0))}


class Trainer:
  """Owns the compiled steps for one config on one mesh. `init_state` / `train_step` / `evaluate`
  are usable on their own (the tests drive them directly); `run` is the whole loop."""

  def __init__(self, config: ml_collections.ConfigDict, task: tasks.Task, mesh: Mesh | None = None):
    self.config = config
    self.task = task
    self.mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    config_lib.validate(config, num_devices=self.mesh.size)
    check_task(config.model, task)
    vocab_size = config.model.vocab_size or task.vocab_size
    if vocab_size < task.vocab_size:
      raise config_lib.ConfigError("model.vocab_size", f"{vocab_size} is smaller than the task's "
                                   f"vocabulary ({task.vocab_size} tokens)")
    num_outputs = vocab_size if config.model.task == "lm" else task.num_classes
    # A mesh with a seq axis runs the model sequence-parallel over it.
    seq_axis = "seq" if self.mesh.shape["seq"] > 1 else None
    self.model = model_lib.build_model(config.model, num_outputs=num_outputs, vocab_size=vocab_size,
                                       deterministic=False, seq_axis=seq_axis)
    self.eval_model = self.model.clone(deterministic=True)
    self.ssm_names = model_lib.ssm_param_names(self.model.pattern)
    self.replicated = NamedSharding(self.mesh, P())
    self._optimizer = None
    self._train_step = None
    self._eval_step = None
    self._position_loss_step = None
    self.state_shardings = None

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's part of the global batch on the mesh: batch over data x fsdp, length
    over seq."""
    return {k: jax.make_array_from_process_local_data(
                sharding_lib.batch_sharding(self.mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}

  def abstract_state(self, example_batch: dict[str, np.ndarray]) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings on this mesh (nothing is
    computed): a restore target for `Checkpointer.restore`. Sets `state_shardings`."""
    tokens = np.asarray(example_batch["tokens"])[:1]
    mask = np.asarray(example_batch["mask"])[:1]
    self._init_params = lambda: self.eval_model.clone(seq_axis=None).init(
        jax.random.PRNGKey(self.config.seed), tokens, mask=mask)["params"]
    params = jax.eval_shape(self._init_params)
    self._optimizer = make_optimizer(self.config.optim, self.config.train.num_steps, params,
                                     self.ssm_names)
    param_shardings = sharding_lib.param_shardings(params, self.mesh, self.config.model.d_model)
    opt_shardings = sharding_lib.optimizer_shardings(self._optimizer, params, param_shardings,
                                                     self.mesh)
    self.state_shardings = TrainState(step=self.replicated, params=param_shardings,
                                      opt_state=opt_shardings, skipped=self.replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(step=scalar, params=params,
                        opt_state=jax.eval_shape(self._optimizer.init, params), skipped=scalar)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        self.state_shardings)

  def init_state(self, example_batch: dict[str, np.ndarray]) -> TrainState:
    """Initialises parameters from `config.seed` and the optimizer state, created sharded on the
    mesh (each device computes only its shards)."""
    self.abstract_state(example_batch)
    shardings = self.state_shardings

    def init():
      params = self._init_params()
      zero = jnp.zeros((), jnp.int32)
      return TrainState(step=zero, params=params, opt_state=self._optimizer.init(params),
                        skipped=zero)

    state = jax.jit(init, out_shardings=shardings)()
    batch_shardings = None  # inferred from the arrays shard_batch places
    self._train_step = jax.jit(
        make_train_step(self.model, self._optimizer, self.config.seed, self.config.train.grad_accum,
                        self.mesh),
        in_shardings=(shardings, batch_shardings), out_shardings=(shardings, self.replicated),
        donate_argnums=0)
    self._eval_step = jax.jit(make_eval_step(self.eval_model, self.mesh),
                              in_shardings=(shardings.params, batch_shardings),
                              out_shardings=self.replicated)
    self._position_loss_step = jax.jit(make_position_loss_step(self.eval_model, self.mesh),
                                       in_shardings=(shardings.params, batch_shardings),
                                       out_shardings=self.replicated)
    return state

  def train_step(self, state: TrainState, batch: dict[str, np.ndarray]):
    if self._train_step is None:
      raise RuntimeError("call init_state before train_step")
    with jax.set_mesh(self.mesh):  # the Pallas kernels shard_map over it (layers.pallas.dispatch)
      return self._train_step(state, self.shard_batch(batch))

  def evaluate(self, params, split: str) -> dict[str, float]:
    """Loss and accuracy over the whole split (every example once; padding examples weigh 0)."""
    totals = None
    if self._eval_step is None:
      raise RuntimeError("call init_state before evaluate")
    for batch in self.task.eval_batches(split):
      with jax.set_mesh(self.mesh):
        out = self._eval_step(params, self.shard_batch(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    weight = max(float(totals["weight"]), 1e-9)
    loss = float(totals["loss_sum"]) / weight
    lm = self.model.head == "lm"
    out = {"loss": loss, "accuracy": float(totals["correct"]) / weight,
           "targets" if lm else "examples": float(totals["weight"])}
    if lm:
      out.update(lm_metrics(loss, self.task.unit))
    return out

  def loss_by_position(self, params, split: str, seq_len: int, max_examples: int) -> dict:
    """The LM loss at each position of windows of `seq_len` tokens (the first `max_examples`
    windows of `split`): {"loss": mean over all targets, "per_position": float list
    [seq_len - 1] (position t predicts token t + 1), "windows": count}."""
    if self._position_loss_step is None:
      raise RuntimeError("call init_state before loss_by_position")
    totals = None
    batches = self.task.eval_batches(split, seq_len=seq_len, max_examples=max_examples)
    for batch in batches:
      with jax.set_mesh(self.mesh):
        out = self._position_loss_step(params, self.shard_batch(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = totals["weight"][:-1]
    per_position = totals["loss_sum"][:-1] / np.maximum(count, 1e-9)
    loss = float(totals["loss_sum"].sum() / max(totals["weight"].sum(), 1e-9))
    return {"loss": loss, **lm_metrics(loss, self.task.unit),
            "per_position": per_position.tolist(), "windows": batches.num_examples}

  def extrapolation(self, params, workdir: pathlib.Path, log: Callable = print) -> dict | None:
    """Length extrapolation of an LM over a corpus stream: `loss_by_position` on validation
    windows of each `train.extrapolation` multiple of data.seq_len (and of seq_len itself),
    written to workdir/extrapolation.json and plotted to extrapolation.png."""
    factors = tuple(self.config.train.extrapolation)
    if not factors or self.model.head != "lm" or not self.task.is_stream:
      return None
    train_length = self.task.seq_len
    lengths = {}
    for factor in (1,) + factors:
      length = int(factor * train_length)
      result = self.loss_by_position(params, "validation", length,
                                     self.config.train.extrapolation_examples)
      lengths[str(length)] = result
      log(f"extrapolation: length {length} ({factor}x) loss {result['loss']:.4f} "
          f"bits/{self.task.unit} {result[f'bits_per_{self.task.unit}']:.4f} on "
          f"{result['windows']} windows")
    record = {"train_length": train_length, "unit": self.task.unit, "lengths": lengths}
    if jax.process_index() == 0:
      (workdir / "extrapolation.json").write_text(json.dumps(record))
      metrics_lib.plot_extrapolation(record, workdir / "extrapolation.png")
    return record

  def run(self, workdir: str | pathlib.Path, *, stop_at: int | None = None, log: Callable = print) -> dict:
    """Trains to `train.num_steps` (resuming from the newest checkpoint in `workdir`), evaluating on
    the validation split every `eval_every` steps and on the test split at the end.

    `stop_at` ends the run early after that many steps, as a preemption would (a checkpoint is
    saved there); the learning-rate schedule still follows `train.num_steps`.
    Returns the final metrics: {"step", "validation": {...}, "test": {...}, "majority_rate"}.
    """
    cfg = self.config.train
    workdir = pathlib.Path(workdir)
    data_iter = self.task.train_iterator()
    first = next(iter(self.task.eval_batches("validation")))
    state = self.init_state(first)
    ckpt_dir = checkpoint_lib.checkpoint_dir(cfg, workdir)
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, every=cfg.checkpoint_every,
                                       keep=cfg.keep_checkpoints)
    restored = ckpt.restore(state)
    if restored is not None:
      state, data_state, step = restored
      data_iter.set_state(data_state)
      log(f"resumed from step {step} in {ckpt_dir}")
    writer = metrics_lib.MetricWriter(workdir)
    end = cfg.num_steps if stop_at is None else min(stop_at, cfg.num_steps)
    step = int(state.step)
    bar = _progress(step, cfg.num_steps, enabled=cfg.progress_bar)
    window: list[dict] = []
    t0 = time.time()
    profiler = _StepProfiler(workdir / "profile", cfg.profile_start, cfg.profile_steps, log)
    try:
      while step < end:
        profiler.before_step(step)
        state, m = self.train_step(state, next(data_iter))
        step += 1
        profiler.after_step(step, m)
        window.append(m)
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
          window = jax.device_get(window)  # one transfer; waits for the queued steps
          means = {k: float(np.mean([x[k] for x in window])) for k in window[0]}
          means["steps_per_s"] = len(window) / max(time.time() - t0, 1e-9)
          window, t0 = [], time.time()
          writer.write("train", step, means)
          bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")
          if means["nonfinite"] > 0:
            log(f"step {step}: {int(round(means['nonfinite'] * cfg.log_every))} step(s) had a non-finite "
                f"loss or gradient and were not applied")
          if not cfg.progress_bar:
            log(metrics_lib.format_metrics("train", step, means))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
          self._log_eval(writer, state, step, "validation", log)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == end):
          ckpt.maybe_save(step, state, data_iter.get_state(), force=step == end)
      bar.close()
      result: dict[str, Any] = {"step": step}
      if step >= cfg.num_steps:
        result["validation"] = self._log_eval(writer, state, step, "validation", log)
        result["test"] = self._log_eval(writer, state, step, "test", log)
        if self.model.head != "lm":
          result["majority_rate"] = self.task.majority_rate("test")
        result["extrapolation"] = self.extrapolation(state.params, workdir, log)
      result["state"] = state
      result["data_state"] = data_iter.get_state()
      return result
    finally:
      profiler.stop()
      ckpt.close()
      writer.close()

  def _log_eval(self, writer, state, step, split, log):
    m = self.evaluate(state.params, split)
    writer.write(split, step, m)
    log(metrics_lib.format_metrics(split, step, m))
    return m


class _StepProfiler:
  """A `jax.profiler` trace of train steps [start, start + steps) into `directory` (every process
  writes its own host's trace there); steps = 0: nothing."""

  def __init__(self, directory: pathlib.Path, start: int, steps: int, log: Callable):
    self.directory, self.start, self.end, self.log = directory, start, start + steps, log
    self.active = False

  def before_step(self, step: int) -> None:
    if not self.active and self.start <= step < self.end:  # an empty range when steps = 0
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after_step(self, step: int, metrics: Any) -> None:
    if self.active and step >= self.end:
      jax.block_until_ready(metrics)  # the traced steps have run, not only been queued
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.start}..{self.end - 1} written to {self.directory} "
               "(tensorboard --logdir or xprof)")


class _NoBar:
  def update(self, n):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _progress(initial: int, total: int, *, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
