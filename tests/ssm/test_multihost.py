"""Multi-host training on one machine: two processes (`jax.distributed.initialize` on 127.0.0.1,
2 CPU devices each) train a tiny hybrid LM on a data=2 x tensor=2 mesh and reach the same losses as
one process with 4 devices; the checkpoint they write together restores in the single process.
The model is two blocks (Mamba-2, attention with its MLP): what is under test here is each
process's share of the data, the collectives between processes and their joint checkpoint; every
mixer's sharding is tested in test_sharding.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from ssm.data import tasks
from tests.devices import ROOT, cpu_devices_env
from tests.ssm.conftest import tiny_config

_WORKER = """
import json, sys
sys.path.insert(0, {root!r})
pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import jax
if nproc > 1:
  jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=nproc, process_id=pid)
import numpy as np
from ssm import checkpoint, train as train_lib
from ssm.data import tasks
from tests.ssm.conftest import tiny_config
from tests.ssm.test_sharding import HYBRID
assert jax.device_count() == 4 and jax.process_count() == nproc
config = tiny_config({tfds!r})
config.model.update({{k: v for k, v in HYBRID.items() if k != "mixers"}}, n_layers=2,
                    pattern="mamba2,attention")
config.model.mixers = {{k: HYBRID["mixers"][k] for k in ("mamba2", "attention")}}
config.mesh.update(data=2, tensor=2)
task = tasks.load_task(config.data, seed=config.seed)
rng = np.random.default_rng(0)
B, L = config.data.batch_size, config.data.seq_len
batches = [dict(tokens=rng.integers(1, task.vocab_size, (B, L)).astype(np.int32),
                mask=np.ones((B, L), bool), label=np.zeros(B, np.int32),
                weight=np.ones(B, np.float32)) for _ in range(3)]
local = lambda b: {{k: v[pid * B // nproc:(pid + 1) * B // nproc] for k, v in b.items()}}
trainer = train_lib.Trainer(config, task)
state = trainer.init_state(local(batches[0]))
ckpt = checkpoint.Checkpointer({ckpt!r}, every=1, async_save=False)
out = {{"losses": []}}
if nproc == 1:  # continue from the checkpoint the two processes wrote after two steps
  restored, _, step = ckpt.restore(state)
  assert step == 2
for i, batch in enumerate(batches):
  if nproc == 1 and i == 2:
    out["restored_rel"] = max(
        float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
              / np.linalg.norm(np.asarray(b, np.float64)))
        for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)),
                        jax.tree.leaves(jax.device_get(state.params))))
  state, m = trainer.train_step(state, local(batch))
  out["losses"].append(float(m["loss"]))
  if nproc > 1 and i == 1:
    ckpt.maybe_save(2, state, {{}}, force=True)
ckpt.close()
if pid == 0:
  print(json.dumps(out))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  config = tiny_config(str(tmp_path / "tfds"))
  tasks.load_task(config.data, seed=config.seed)  # build the data once, before the workers
  script = _WORKER.format(root=str(ROOT), tfds=str(tmp_path / "tfds"), ckpt=str(tmp_path / "ckpt"))
  port = str(_free_port())

  def launch(pid, nproc, devices):
    return subprocess.Popen([sys.executable, "-c", script, str(pid), str(nproc), port],
                            env=cpu_devices_env(devices),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  workers = [launch(pid, 2, 2) for pid in range(2)]
  outputs = [w.communicate(timeout=900) for w in workers]
  for w, (_, err) in zip(workers, outputs):
    assert w.returncode == 0, err[-3000:]
  two = json.loads(outputs[0][0].strip().splitlines()[-1])
  single = launch(0, 1, 4)
  out, err = single.communicate(timeout=900)
  assert single.returncode == 0, err[-3000:]
  one = json.loads(out.strip().splitlines()[-1])
  for a, b in zip(two["losses"], one["losses"]):
    assert abs(a - b) < 1e-5 * abs(b), (two, one)
  # The single process restored the two-process checkpoint: same parameters as its own after 2
  # steps (it trained the same batches), and the same third loss.
  assert one["restored_rel"] < 1e-5
