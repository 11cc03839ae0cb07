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


_OPS_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from layers.gated_delta import gated_delta_rule
from layers.mamba import selective_scan
from layers.mamba2 import ssd
from ssm import sequence_parallel as sp
from tests.numerics import rel
mesh = Mesh(np.asarray(jax.devices()).reshape(4), ("seq",))
rng = np.random.default_rng(0)
f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
b, L = 2, 32
seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, L)), axis=1), jnp.int32)
seq = lambda nd: P(None, "seq", *([None] * (nd - 2)))
rep = P()

def sharded(local, args, specs, seg_ids):
  def body(*a):
    *a, s = a
    return local(*a, s)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(*specs, P(None, "seq")),
                               out_specs=P(None, "seq"), check_vma=False))(*args, seg_ids)

out = {{}}
# SSD: x [b, L, H, P], dt [b, L, H], A [H], B/C [b, L, G, N], D [H].
x, dt = f(b, L, 4, 3), jnp.exp(f(b, L, 4) - 2.0)
A, Bm, Cm, D = -jnp.exp(f(4)), f(b, L, 2, 5), f(b, L, 2, 5), f(4)
for name, s in (("ssd", None), ("ssd_packed", seg)):
  ref = ssd(x, dt, A, Bm, Cm, D, segment_ids=s, chunk_size=4)[0]
  got = sharded(lambda x, dt, A, Bm, Cm, D, s_: sp.ssd_local(
      x, dt, A, Bm, Cm, D, segment_ids=None if s is None else s_, chunk_size=4),
      (x, dt, A, Bm, Cm, D), (seq(4), seq(3), rep, seq(4), seq(4), rep), seg)
  out[name] = rel(got, ref)
# Selective scan: u/delta/z [b, L, D], A [D, N], B/C [b, L, N].
u, delta, z = f(b, L, 6), f(b, L, 6), f(b, L, 6)
A1, B1, C1, D1 = -jnp.exp(f(6, 4)), f(b, L, 4), f(b, L, 4), f(6)
for name, s in (("selective_scan", None), ("selective_scan_packed", seg)):
  ref = selective_scan(u, delta, A1, B1, C1, D1, z=z, delta_softplus=True, segment_ids=s)[0]
  got = sharded(lambda u, delta, z, A1, B1, C1, D1, s_: sp.selective_scan_local(
      u, delta, A1, B1, C1, D1, z=z, delta_softplus=True, segment_ids=None if s is None else s_),
      (u, delta, z, A1, B1, C1, D1), (seq(3), seq(3), seq(3), rep, seq(3), seq(3), rep), seg)
  out[name] = rel(got, ref)
# Gated delta rule: q/k [b, L, 2, 4] (L2-normalised), v [b, L, 4, 3], g/beta [b, L, 4].
norm = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
q, k, v = norm(f(b, L, 2, 4)), norm(f(b, L, 2, 4)), f(b, L, 4, 3)
g, beta = -jnp.exp(f(b, L, 4) - 2.0), jax.nn.sigmoid(f(b, L, 4))
for name, s in (("gated_delta", None), ("gated_delta_packed", seg)):
  ref = gated_delta_rule(q, k, v, g, beta, segment_ids=s, chunk_size=4)[0]
  got = sharded(lambda q, k, v, g, beta, s_: sp.gated_delta_rule_local(
      q, k, v, g, beta, segment_ids=None if s is None else s_, chunk_size=4),
      (q, k, v, g, beta), (seq(4), seq(4), seq(4), seq(3), seq(3)), seg)
  out[name] = rel(got, ref)
print(json.dumps(out))
"""


def test_linear_recurrence_ops_scan_locally_and_correct():
  script = _OPS_SCRIPT.format(root=str(ROOT))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(errors) == 6
  for name, err in errors.items():
    assert err < 1e-5, (name, err)
