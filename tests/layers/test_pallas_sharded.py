"""layers.pallas.dispatch.on_mesh: under an 8-device CPU mesh (data=2 x tensor=4, set with
jax.set_mesh), each Pallas kernel (interpret mode) runs inside shard_map over batch and heads and
gives the single-device result, outputs and gradients."""

from __future__ import annotations

from tests.devices import ROOT, run_on_cpu_devices

_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from layers.attention import window_attention
from layers.gated_delta import gated_delta_rule
from layers.mamba import selective_scan
from layers.mamba2 import ssd
from tests.numerics import rel
assert jax.device_count() == 8
mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
b, L = 2, 24
seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, L)), axis=1), jnp.int32)
norm = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
cases = {{
    # u, delta [b, L, 8 channels], A [8, 4], B, C [b, L, 4]
    "selective_scan": (lambda u, d, A, B, C, s: selective_scan(
        u, d, A, B, C, delta_softplus=True, segment_ids=s, impl="pallas", chunk_size=8)[0],
        (f(b, L, 8), f(b, L, 8), -jnp.exp(f(8, 4)), f(b, L, 4), f(b, L, 4), seg)),
    # x [b, L, 4 heads, 8], dt [b, L, 4], A [4], B, C [b, L, 1 group, 16]
    "ssd": (lambda x, dt, A, B, C, s: ssd(x, dt, A, B, C, segment_ids=s, impl="pallas",
                                          chunk_size=16)[0],
            (f(b, L, 4, 8), jnp.exp(f(b, L, 4) - 2.0), -jnp.exp(f(4)), f(b, L, 1, 16),
             f(b, L, 1, 16), seg)),
    # q, k [b, L, 4 heads, 16], v [b, L, 8 value heads, 16], g, beta [b, L, 8]
    "gated_delta": (lambda q, k, v, g, beta, s: gated_delta_rule(
        q, k, v, g, beta, segment_ids=s, impl="pallas", chunk_size=16)[0],
        (norm(f(b, L, 4, 16)), norm(f(b, L, 4, 16)), f(b, L, 8, 16),
         -jnp.exp(f(b, L, 8) - 2.0), jax.nn.sigmoid(f(b, L, 8)), seg)),
    # q [b, L, 8 heads, 16], k, v [b, L, 4 kv heads, 16] (GQA), a window of 5 < L, documents
    "window_attention": (lambda q, k, v, s: window_attention(
        q, k, v, window=5, segment_ids=s, impl="pallas"),
        (f(b, L, 8, 16), f(b, L, 4, 16), f(b, L, 4, 16), seg)),
}}
out = {{}}
for name, (op, args) in cases.items():
  w = jnp.asarray(rng.normal(size=jax.eval_shape(op, *args).shape), jnp.float32)
  loss = lambda *a: jnp.sum(op(*a) * w)
  grad = jax.grad(loss, argnums=tuple(range(len(args) - 1)))
  ref, g_ref = jax.jit(op)(*args), jax.jit(grad)(*args)
  with jax.set_mesh(mesh):
    placed = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
    jaxpr = str(jax.make_jaxpr(op)(*placed))
    got, g_got = jax.jit(op)(*placed), jax.jit(grad)(*placed)
  out[name] = {{"shard_map": "shard_map" in jaxpr, "forward": rel(got, ref),
               "grad": max(rel(a, b) for a, b in zip(g_got, g_ref))}}
print(json.dumps(out))
"""


def test_kernels_under_a_mesh_run_sharded_and_equal_one_device():
  out = run_on_cpu_devices(["-c", _SCRIPT.format(root=str(ROOT))], 8)
  assert set(out) == {"selective_scan", "ssd", "gated_delta", "window_attention"}
  for name, r in out.items():
    assert r["shard_map"], name  # the kernel ran inside shard_map, not under GSPMD
    assert r["forward"] < 1e-5 and r["grad"] < 1e-5, (name, r)
