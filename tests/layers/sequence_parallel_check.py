"""Sequence-parallel checks of mixers, run in a subprocess with several CPU devices.

`sequence_parallel_errors(cases)` starts `python -m tests.layers.sequence_parallel_check` with 4
host devices. For each case (mixer name, constructor kwargs) it builds the mixer twice, whole-sequence
and with `seq_axis="seq"`, and compares on random inputs [2, 32, 16] (one document, and packed
documents) the outputs and the gradients (of a random projection of the outputs, with respect to
the inputs and every parameter) of
  - the mixer over the whole sequence on one device, and
  - the seq_axis mixer on 4 shards of 8 tokens inside `jax.shard_map` over a mesh axis "seq"
    (and on seq=2 x data=2, the batch split over "data").
Returns {case: {"forward": e, "forward_packed": e, "grad": e, "grad_packed": e, "forward_2d": e}}
(relative errors, see tests.numerics.rel).
"""

from __future__ import annotations

import json
import sys

from tests.devices import ROOT, run_on_cpu_devices

DEVICES = 4


def sequence_parallel_errors(cases: dict[str, tuple[str, dict]], *, length: int = 32,
                             d_model: int = 16, timeout: int = 1200) -> dict[str, dict]:
  spec = json.dumps({"cases": cases, "length": length, "d_model": d_model})
  return run_on_cpu_devices(["-m", "tests.layers.sequence_parallel_check", spec], DEVICES,
                            timeout=timeout)


def _main(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P

  from layers import blocks
  from tests.numerics import rel

  assert jax.device_count() == DEVICES, jax.devices()
  rng = np.random.default_rng(0)
  length, d = spec["length"], spec["d_model"]
  x = jnp.asarray(rng.normal(size=(2, length, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, length, d)), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, length)), axis=1), jnp.int32)
  seq4 = Mesh(np.asarray(jax.devices()).reshape(4), ("seq",))
  seq2_data2 = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "seq"))
  flat = lambda tree: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])

  def forward_and_grad(f):
    """jit of (v, x, s) -> (f(v, x, s), the gradient of sum(f(v, x, s) * w) with respect to
    (v, x)): the output comes out of the gradient's program as its aux value, so each side
    compiles once instead of once for the output and once for the gradient."""
    def loss(v, x, s):
      y = f(v, x, s)
      return jnp.sum(y * w), y
    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(lambda v, x, s: grad(v, x, s)[::-1])

  out = {}
  for label, (name, kwargs) in spec["cases"].items():
    cls = blocks.get_mixer(name)
    whole = cls(d_model=d, **kwargs)
    sharded = cls(d_model=d, seq_axis="seq", **kwargs)
    variables = jax.jit(whole.init)(jax.random.PRNGKey(0), x)

    def run_whole(v, x, s):
      return whole.apply(v, x, segment_ids=s)[0]

    def run_sharded(mesh, batch_axis, with_segments):
      xs = P(batch_axis, "seq", None)
      ss = P(batch_axis, "seq")
      body = lambda v, x, s: sharded.apply(v, x, segment_ids=s if with_segments else None)[0]
      return jax.shard_map(body, mesh=mesh, in_specs=(P(), xs, ss), out_specs=xs,
                           check_vma=False)

    errors = {}
    for tag, s in (("", None), ("_packed", seg)):
      ref, g_ref = forward_and_grad(run_whole)(variables, x, s)
      # The sharded map always takes segment ids (as its third input); without packing it ignores them.
      got, g_sp = forward_and_grad(run_sharded(seq4, None, s is not None))(variables, x, seg)
      errors["forward" + tag] = rel(got, ref)
      errors["grad" + tag] = rel(flat(g_sp), flat(g_ref))
      if s is None:
        ref_one_document = ref
    errors["forward_2d"] = rel(jax.jit(run_sharded(seq2_data2, "data", False))(variables, x, seg),
                               ref_one_document)
    out[label] = errors
  return out


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  print(json.dumps(_main(json.loads(sys.argv[1]))))
