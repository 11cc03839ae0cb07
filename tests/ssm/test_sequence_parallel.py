"""ssm.sequence_parallel.model_apply: models with their sequences split over 4 devices of the `seq`
axis give the logits and parameter gradients of the unsharded model: an LM with packed documents,
a classifier of bidirectional mixers with padding and mean pooling,
and one with last-token pooling. (Each mixer on seq=2 x data=2: tests/layers, through
sequence_parallel_check; the train step on seq=4 x data=2: tests/ssm/test_sharding.py.)"""

from __future__ import annotations

from tests.devices import ROOT, run_on_cpu_devices

# One mixer per kind of exchange: a recurrence (carried-in state), a sliding window (halo) and a
# long convolution (all-to-all). Every mixer kind runs sequence-parallel inside a whole train
# step in tests/ssm/test_sharding.py (seq=4 x data=2) and alone in tests/layers.
CAUSAL = dict(
    pattern="mamba2,attention,long_conv",
    mixers=dict(mamba2=dict(d_state=8, headdim=8, chunk_size=8),
                attention=dict(num_heads=2, num_kv_heads=1, window=6, block_size=4),
                long_conv=dict(max_length=32)))
LAST = dict(pattern="mamba2", mixers=dict(mamba2=dict(d_state=8, headdim=8, chunk_size=8)))
BIDIRECTIONAL = dict(
    pattern="s4d,long_conv,attention",
    mixers=dict(s4d=dict(d_state=8, bidirectional=True),
                long_conv=dict(max_length=32, bidirectional=True),
                attention=dict(num_heads=2, causal=False, block_size=4)))

_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from ssm import config as config_lib, model as model_lib
from ssm.sequence_parallel import model_apply
from tests.numerics import rel
assert jax.device_count() == 4
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, 11, (2, 32)), jnp.int32)
seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, 32)), axis=1), jnp.int32)
mask = jnp.asarray(np.arange(32)[None] < np.array([[32], [19]]))
mesh = Mesh(np.asarray(jax.devices()).reshape(4), ("seq",))
flat = lambda tree: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])
# f(v) and the gradient of sum(f(v) * w) from one compiled program: the logits come out of the
# gradient's program as its aux value instead of from a second compile of the forward pass.
def logits_and_grad(f, v, w):
  def loss(v):
    logits = f(v)
    return jnp.sum(logits * w), logits
  grad, logits = jax.jit(jax.grad(loss, has_aux=True))(v)
  return logits, grad
out = {{}}
cases = {{"lm": ("lm", {causal!r}, "mean"),
         "classify_mean": ("classify", {bidirectional!r}, "mean"),
         "classify_last": ("classify", {last!r}, "last")}}
for label, (task, model_cfg, pool) in cases.items():
  cfg = config_lib.build(name="sp", model=dict(task=task, d_model=16, n_layers=len(
      model_cfg["pattern"].split(",")), pool=pool, mlp_ratio=2, **model_cfg))
  whole = model_lib.build_model(cfg.model, num_outputs=11, vocab_size=11)
  sharded = whole.clone(seq_axis="seq")
  kwargs = dict(segment_ids=seg) if task == "lm" else dict(mask=mask)
  variables = jax.jit(whole.init)(jax.random.PRNGKey(0), tokens, **kwargs)
  run_whole = lambda v: whole.apply(v, tokens, **kwargs)[0]
  run = lambda v: model_apply(sharded, v, tokens, mesh=mesh, **kwargs)
  w = jnp.asarray(rng.normal(size=jax.eval_shape(run_whole, variables).shape), jnp.float32)
  ref, g_ref = logits_and_grad(run_whole, variables, w)
  got, g = logits_and_grad(run, variables, w)
  out[label] = {{"logits": rel(got, ref), "grad": rel(flat(g), flat(g_ref))}}
print(json.dumps(out))
"""


def test_model_sequence_parallel_equals_unsharded():
  script = _SCRIPT.format(root=str(ROOT), causal=CAUSAL, bidirectional=BIDIRECTIONAL, last=LAST)
  errors = run_on_cpu_devices(["-c", script], 4)
  assert sorted(errors) == ["classify_last", "classify_mean", "lm"]
  for name, errs in errors.items():
    assert max(errs.values()) < 1e-5, (name, errs)
