"""LRA Retrieval: whether two ACL Anthology Network papers cite each other (2 classes), from
the UTF-8 bytes of both documents, up to 4,000 each, with a two-tower head (the same encoder on
both, then an MLP on [u, v, u * v, u - v]). Data: the LRA release TSVs
lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv in data.manual_dir
(ssm.data.lra_retrieval).

Presets (`--config experiments/lra/retrieval.py[:preset]`):
  (none)  S4, as the S4 repository's configs/experiment/lra/s4-aan.yaml: 6 pre-norm layers,
          d_model 256, d_state 4, one shared SSM, bidirectional, batch 64, lr 0.01 (SSM 0.001),
          weight decay 0.05, 50k steps (20 epochs) with 5k warmup.
  s5      S5, as S5's bin/run_experiments/run_lra_aan.sh: 6 layers, d_model 128, P = 256 in 16
          blocks, trunc_standard_normal C, batch 32, lr 0.002 (SSM 0.001), weight decay 0.05,
          20 epochs with 1 epoch of warmup.
  cpu     S4D, 2 x 32, on the first 512 bytes of each document, 400 steps.
Deviations from the published setups: `ssm.experiment_configs.LRA_DEVIATIONS`.
"""

from ssm import experiment_configs as ex

DATA = dict(name="lra_retrieval", seq_len=4000, max_length=4000)
TRAIN = 147_086  # pairs in new_aan_pairs.train.tsv


def s4():
  return ex.lra_s4(name="lra_retrieval_s4", data=DATA, n_layers=6, d_model=256, d_state=4,
                   prenorm=True, dropout=0.0, batch_size=64, lr=0.01, ssm_lr=0.001,
                   weight_decay=0.05, num_steps=50_000, warmup_steps=5_000)


def s5():
  return ex.lra_s5(name="lra_retrieval_s5", data=DATA, n_layers=6, d_model=128, d_state=256,
                   blocks=16, c_init="trunc_standard_normal", dropout=0.0, batch_size=32,
                   lr=0.002, ssm_lr=0.001, weight_decay=0.05,
                   num_steps=ex.steps(20, TRAIN, 32), warmup_steps=ex.steps(1, TRAIN, 32))


def cpu():
  return ex.cpu_preset(s4(), data=dict(seq_len=512, max_length=512))


def get_config(preset=None):
  return ex.select(__file__, preset, {None: s4, "s5": s5, "cpu": cpu})
