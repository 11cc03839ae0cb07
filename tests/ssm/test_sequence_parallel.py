"""ssm.sequence_parallel: every causal mixer, with its sequence split over 4 devices of the `seq`
mesh axis (and over seq=2 x data=2), gives its single-device forward (packed documents included)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

MIXERS = {
    "s4d": dict(d_state=8), "s5": dict(d_state=8), "mamba": dict(d_state=4),
    "mamba2": dict(d_state=8, headdim=8, chunk_size=8), "long_conv": dict(max_length=32),
    "hyena": dict(max_length=32, filter_order=8),
    "attention": dict(num_heads=2, num_kv_heads=1, window=6, block_size=4),
    "gated_deltanet": dict(num_heads=2, head_dim_k=8, chunk_size=4),
}

_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from layers import blocks
from ssm.sequence_parallel import sequence_parallel_apply
from tests.numerics import rel
assert jax.device_count() == 4
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.float32)
seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, 32)), axis=1), jnp.int32)
seq4 = Mesh(np.asarray(jax.devices()).reshape(4), ("seq",))
seq2_data2 = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "seq"))
out = {{}}
for name, kwargs in {mixers!r}.items():
  module = blocks.get_mixer(name)(d_model=16, **kwargs)
  variables = module.init(jax.random.PRNGKey(0), x)
  ref = module.apply(variables, x)[0]
  ref_seg = module.apply(variables, x, segment_ids=seg)[0]
  sp = jax.jit(lambda v, x: sequence_parallel_apply(module, v, x, mesh=seq4))(variables, x)
  sp_seg = jax.jit(lambda v, x, s: sequence_parallel_apply(module, v, x, mesh=seq4, segment_ids=s))(
      variables, x, seg)
  sp_2d = jax.jit(lambda v, x: sequence_parallel_apply(module, v, x, mesh=seq2_data2,
                                                       batch_axes=("data",)))(variables, x)
  out[name] = [rel(sp, ref), rel(sp_seg, ref_seg), rel(sp_2d, ref)]
print(json.dumps(out))
"""


def test_every_mixer_sequence_parallel_equals_single_device():
  script = _SCRIPT.format(root=str(ROOT), mixers=MIXERS)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(errors) == set(MIXERS)
  for name, errs in errors.items():
    assert max(errs) < 1e-5, (name, errs)
