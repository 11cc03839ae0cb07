"""ssm.sharding: mesh sizes from the config, the logical-axis rules, and a train step of a tiny
hybrid LM that gives the same loss and parameters on every 8-device mesh as on one device; a
checkpoint written on one mesh restores on another."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from ssm import config as config_lib
from ssm import sharding
from tests.devices import ROOT, run_on_cpu_devices


def test_mesh_shape_fills_the_free_axis_and_names_bad_fields():
  assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == {
      "data": 4, "fsdp": 1, "tensor": 2, "seq": 1}
  assert sharding.mesh_shape(None, 8)["data"] == 8
  with pytest.raises(config_lib.ConfigError, match="'mesh.fsdp': only one mesh axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(config_lib.ConfigError, match="'mesh.data': the other axes use 3 devices"):
    sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(config_lib.ConfigError, match="'mesh': .* use 4 devices, but there are 8"):
    sharding.mesh_shape({"data": 2, "tensor": 2}, 8)
  with pytest.raises(config_lib.ConfigError, match="'mesh.pipe': unknown mesh axis"):
    sharding.mesh_shape({"pipe": 2}, 8)


class FakeMesh:
  """Only `shape` is read by spec_for."""

  def __init__(self, **shape):
    self.shape = {axis: shape.get(axis, 1) for axis in sharding.MESH_AXES}


def test_specs_follow_the_rules_and_skip_axes_that_do_not_divide():
  mesh = FakeMesh(data=2, fsdp=2, tensor=4)
  assert sharding.spec_for(("embed", "mlp"), (16, 64), mesh) == P("fsdp", "tensor")
  assert sharding.spec_for(("embed", "mlp"), (16, 6), mesh) == P("fsdp", None)  # 6 % 4 != 0
  assert sharding.spec_for(("batch", "length"), (8, 48), mesh) == P(("data", "fsdp"), None)
  assert sharding.spec_for(("batch",), (2,), mesh) == P("data")  # data x fsdp = 4 does not divide 2
  assert sharding.spec_for((None, "layers"), (3, 5), mesh) == P(None, None)


def test_parameter_logical_axes_from_shapes():
  key = jax.tree_util.DictKey
  assert sharding.param_logical_axes((key("in_proj"), key("kernel")), (16, 64), 16) == (
      "embed", "mlp")
  assert sharding.param_logical_axes((key("out_proj"), key("kernel")), (64, 16), 16) == (
      "mlp", "embed")
  assert sharding.param_logical_axes((key("groups"), key("0_s4d"), key("kernel")), (3, 16, 32),
                                     16) == ("layers", "embed", "mlp")
  # Square projections: the input's embed is the first dimension, the output's the last.
  assert sharding.param_logical_axes((key("q_proj"), key("kernel")), (16, 16), 16) == (
      "embed", "mlp")
  assert sharding.param_logical_axes((key("o_proj"), key("kernel")), (16, 16), 16) == (
      "mlp", "embed")
  assert sharding.param_logical_axes((key("scale"),), (16,), 16) == (None,)
  assert sharding.param_logical_axes((key("A_log"),), (8, 4), 16) == (None, None)


MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2},
          {"seq": 4, "data": 2}]
# One block of every mixer type. Only the attention block has an MLP (mlp_ratio 2, a
# transformer block); the others have none (mlp_ratio 0, the Mamba-style block): both kinds of
# residual block are in the model, and the six MLPs that would repeat the same module are not
# compiled for every mesh. S4D is causal here (tiny_config's, for its classifier, is not).
HYBRID = dict(
    task="lm", d_model=16, n_layers=7,
    pattern="s4d,mamba,mamba2,long_conv,hyena,attention,gated_deltanet",
    mlp_ratio=0,
    mixers=dict(s4d=dict(d_state=8, bidirectional=False), mamba=dict(d_state=4),
                mamba2=dict(d_state=8, headdim=8, chunk_size=8),
                long_conv=dict(max_length=48), hyena=dict(max_length=48, filter_order=8),
                attention=dict(num_heads=2, num_kv_heads=1, window=8, block_size=8, mlp_ratio=2),
                gated_deltanet=dict(num_heads=2, head_dim_k=8, chunk_size=8)))


def test_train_step_is_the_same_on_every_mesh(tmp_path):
  script = _MESH_SCRIPT.format(root=str(ROOT), tfds=str(tmp_path / "tfds"),
                               ckpt=str(tmp_path / "ckpt"), hybrid=HYBRID, meshes=MESHES)
  result = run_on_cpu_devices(["-c", script], 8)
  for mesh, errors in result["meshes"].items():
    assert errors["loss"] < 1e-5 and errors["params"] < 1e-5, (mesh, errors)
  assert result["restored"]["loss"] < 1e-5, result["restored"]


_MESH_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
assert jax.device_count() == 8, jax.devices()
from ssm import checkpoint, sharding, train as train_lib
from ssm.data import tasks
from tests.ssm.conftest import tiny_config
config = tiny_config({tfds!r})
config.model.update({hybrid!r})
task = tasks.load_task(config.data, seed=config.seed)
it = task.train_iterator()
batches = [next(it) for _ in range(3)]

def trainer_on(mesh_cfg, n):
  config.mesh.update(dict(dict(data=1, fsdp=1, tensor=1, seq=1), **mesh_cfg))
  return train_lib.Trainer(config, task, mesh=sharding.make_mesh(config.mesh, jax.devices()[:n]))

def steps(trainer, state, which):
  losses = []
  for b in which:
    state, m = trainer.train_step(state, batches[b])
    losses.append(float(m["loss"]))
  return state, losses

flat = lambda s: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                 for x in jax.tree.leaves(jax.device_get(s.params))])
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
worst = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))

one = trainer_on({{}}, 1)
state1, losses1 = steps(one, one.init_state(batches[0]), [0, 1])
params1 = flat(state1)
state1, loss1_third = steps(one, state1, [2])
result = {{"meshes": {{}}}}
trainers = {{}}
for mesh_cfg in {meshes!r}:
  trainer = trainers[json.dumps(mesh_cfg)] = trainer_on(mesh_cfg, 8)
  state, losses = steps(trainer, trainer.init_state(batches[0]), [0, 1])
  assert state.params is not None
  result["meshes"][json.dumps(mesh_cfg)] = {{"loss": worst(losses, losses1),
                                             "params": rel(flat(state), params1)}}
  if mesh_cfg == {{"data": 8}}:
    ckpt = checkpoint.Checkpointer({ckpt!r}, every=1, async_save=False)
    ckpt.maybe_save(2, state, {{}}, force=True)
    ckpt.close()
# Restore the data=8 checkpoint on data=2 x tensor=4 and take the third step there.
trainer = trainers[json.dumps({{"data": 2, "tensor": 4}})]  # its step is compiled already
target = trainer.abstract_state(batches[0])
restored, _, step = checkpoint.Checkpointer({ckpt!r}, every=0).restore(target)
assert step == 2
assert restored.params["out"]["kernel"].sharding == target.params["out"]["kernel"].sharding
_, third = steps(trainer, restored, [2])
result["restored"] = {{"loss": worst(third, loss1_third)}}
print(json.dumps(result))
"""
