"""layers.sequence_parallel: the collectives the mixers use, on 4 CPU devices (a subprocess),
against the same quantities read off the whole sequence with numpy / the unsharded scan."""

from __future__ import annotations

from tests.devices import ROOT, run_on_cpu_devices

_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from layers import sequence_parallel as sp
from layers.scan import linear_scan
from tests.numerics import rel
n, T, C = 4, 8, 12
L = n * T
mesh = Mesh(np.asarray(jax.devices()).reshape(n), ("seq",))
rng = np.random.default_rng(0)
x = rng.normal(size=(2, L, C)).astype(np.float32)
seg = np.sort(rng.integers(0, 5, (2, L)), axis=1).astype(np.int32)
per_shard = lambda f, *a: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(None, "seq"),
                                                out_specs=P(None, "seq"), check_vma=False))(*a)
out = {{}}

# from_previous_shards: shard i gets positions [iT - w, iT), fill before the start.
for width in (3, 8, 13, 40):
  got = np.asarray(per_shard(lambda a: sp.from_previous_shards(a, width, "seq", fill=-7.0), x))
  want = []
  for i in range(n):
    idx = np.arange(i * T - width, i * T)
    want.append(np.where((idx >= 0)[None, :, None], x[:, np.clip(idx, 0, None)], -7.0))
  out[f"from_previous_shards_{{width}}"] = float(np.abs(got - np.concatenate(want, 1)).max())
  # from_next_shards: shard i gets positions [(i+1)T, (i+1)T + w), fill past the end.
  got = np.asarray(per_shard(lambda a: sp.from_next_shards(a, width, "seq", fill=-7.0), x))
  want = []
  for i in range(n):
    idx = np.arange((i + 1) * T, (i + 1) * T + width)
    want.append(np.where((idx < L)[None, :, None], x[:, np.clip(idx, None, L - 1)], -7.0))
  out[f"from_next_shards_{{width}}"] = float(np.abs(got - np.concatenate(want, 1)).max())

# sequence_to_channels: shard i holds the whole sequence of channels [iC/n, (i+1)C/n).
to_channels = per_shard(lambda a: sp.sequence_to_channels(a, "seq"), x)  # [2, n*L, C/n] stacked
want = np.concatenate([x[:, :, i * C // n:(i + 1) * C // n] for i in range(n)], axis=1)
out["sequence_to_channels"] = float(np.abs(np.asarray(to_channels) - want).max())
back = per_shard(lambda a: sp.channels_to_sequence(sp.sequence_to_channels(a, "seq"), "seq"), x)
out["round_trip"] = float(np.abs(np.asarray(back) - x).max())
kernel = rng.normal(size=(3, C)).astype(np.float32)
sliced = jax.jit(jax.shard_map(lambda k: sp.channel_shard(k, "seq")[None], mesh=mesh,
                               in_specs=P(), out_specs=P("seq"), check_vma=False))(kernel)
out["channel_shard"] = float(np.abs(np.asarray(sliced) - np.stack(
    [kernel[:, i * C // n:(i + 1) * C // n] for i in range(n)])).max())
try:
  per_shard(lambda a: sp.sequence_to_channels(a[..., :10], "seq"), x)
  out["indivisible_error"] = "no error"
except ValueError as e:
  out["indivisible_error"] = str(e)

# linear_scan_local: h_t = a_t h_(t-1) + b_t, forward and reverse, one document and packed, real
# and complex; outputs and gradients equal the whole-sequence scan.
w = rng.normal(size=(2, L, C))
def scan_and_grad(f, a, b):
  # f(a, b) and the gradient of sum(Re f * w + Im f * w) with respect to (a, b), from one compiled
  # program (the scan's output is the gradient's aux value).
  def loss(a, b):
    h = f(a, b)
    return jnp.sum(jnp.real(h) * w + jnp.imag(h) * w), h
  grads, h = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(a, b)
  return h, grads
for kind in ("real", "complex"):
  a = rng.uniform(0.5, 1.0, (2, L, C)).astype(np.float32)
  b = rng.normal(size=(2, L, C)).astype(np.float32)
  if kind == "complex":
    a = (a * np.exp(1j * rng.uniform(0, 1, (2, L, C)))).astype(np.complex64)
    b = (b + 1j * rng.normal(size=(2, L, C))).astype(np.complex64)
  for reverse in (False, True):
    for tag, s in (("", None), ("_packed", seg)):
      ids = seg if s is None else s
      whole = lambda a, b: linear_scan(a, b, segment_ids=s, reverse=reverse)[0]
      local = jax.shard_map(
          lambda a, b, i: sp.linear_scan_local(a, b, segment_ids=None if s is None else i,
                                               axis="seq", reverse=reverse),
          mesh=mesh, in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq"), check_vma=False)
      name = f"linear_scan_{{kind}}_{{'reverse' if reverse else 'forward'}}{{tag}}"
      y_whole, g_whole = scan_and_grad(whole, a, b)
      y_local, g_local = scan_and_grad(lambda a, b: local(a, b, ids), a, b)
      out[name] = rel(y_local, y_whole)
      out[name + "_grad"] = max(rel(gl, gw) for gl, gw in zip(g_local, g_whole))
print(json.dumps(out))
"""


def test_collectives_and_local_scan_match_the_whole_sequence():
  out = run_on_cpu_devices(["-c", _SCRIPT.format(root=str(ROOT))], 4)
  assert "10 channels do not divide over the 4 shards of mesh axis 'seq'" in (
      out.pop("indivisible_error"))
  exact = [f"from_{side}_shards_{width}" for side in ("previous", "next")
           for width in (3, 8, 13, 40)]
  for key in exact + ["sequence_to_channels", "round_trip", "channel_shard"]:
    assert out.pop(key) == 0.0, key
  assert len(out) == 16  # 2 kinds x 2 directions x 2 packings, outputs and gradients
  for key, err in out.items():
    assert err < 1e-5, (key, err)
