"""LRA ListOps: the value 0..9 of a nested expression of MAX / MIN / MED / SUM_MOD over digits,
up to 2,000 tokens. Data: the LRA release files from `data.manual_dir`
(lra_release/listops-1000/basic_{train,val,test}.tsv), else the clean-room generator (96k / 2k /
2k expressions of 500-2000 tokens).

Presets (`--config experiments/lra/listops.py[:preset]`):
  (none)  S4, as the S4 repository's configs/experiment/lra/s4-listops.yaml: 6 post-norm layers,
          d_model 256, d_state 4, one shared SSM, bidirectional, batch 32, lr 0.01 (SSM 0.001),
          weight decay 0.05, 120k steps with 12k warmup.
  s5      S5, as S5's bin/run_experiments/run_lra_listops.sh: 8 layers, d_model 128, P = 16
          states in 8 blocks, lecun_normal C, batch 50, lr 0.003 (SSM 0.001), weight decay 0.04,
          40 epochs with 1 epoch of warmup.
  s4d     the S4D paper's model: S4D-Lin, 8 post-norm layers, d_model 128, d_state 64, batch 50,
          40 epochs (76,800 steps) with 2k warmup.
  cpu     a laptop-sized S4D run on short generated expressions (the `make demo` job): a few
          minutes on 2 cores.
Deviations from the published setups: `ssm.experiment_configs.LRA_DEVIATIONS`.
"""

from ssm import config as config_lib
from ssm import experiment_configs as ex

DATA = dict(name="lra_listops", seq_len=2048)


def s4():
  return ex.lra_s4(name="lra_listops_s4", data=DATA, n_layers=6, d_model=256, d_state=4,
                   prenorm=False, dropout=0.0, batch_size=32, lr=0.01, ssm_lr=0.001,
                   weight_decay=0.05, num_steps=120_000, warmup_steps=12_000)


def s5():
  return ex.lra_s5(name="lra_listops_s5", data=DATA, n_layers=8, d_model=128, d_state=16,
                   blocks=8, c_init="lecun_normal", dropout=0.0, batch_size=50, lr=0.003,
                   ssm_lr=0.001, weight_decay=0.04, num_steps=ex.steps(40, 96_000, 50),
                   warmup_steps=ex.steps(1, 96_000, 50))


def s4d():
  """The S4D paper's ListOps model (S4D-Lin, 8 x 128, d_state 64, batch 50, 40 epochs)."""
  config = ex.lra_s4(name="lra_listops_s4d", data=DATA, n_layers=8, d_model=128, d_state=64,
                     prenorm=False, dropout=0.0, batch_size=50, lr=0.01, ssm_lr=0.001,
                     weight_decay=0.05, num_steps=ex.steps(40, 96_000, 50), warmup_steps=2_000)
  config.model.pattern = "s4d"
  config.model.mixers = config_lib.ml_collections.ConfigDict(dict(s4d=dict(
      d_state=64, a_init="lin", dt_min=1e-3, dt_max=1e-1, bidirectional=True)))
  return config


def cpu():
  config = ex.cpu_preset(
      s4(), data=dict(num_train=20_000, num_val=1_000, num_test=1_000, min_length=10,
                      max_length=128, max_depth=4, max_args=5, seq_len=128),
      num_steps=3_000, d_model=64, n_layers=4, lr=0.004, batch_size=32)
  config.name = "lra_listops"
  return config_lib.merge(config, dict(
      model=dict(mixers=dict(s4d=dict(d_state=32))), data=dict(eval_batch_size=128),
      optim=dict(warmup_steps=100, weight_decay=0.05),
      train=dict(log_every=50, eval_every=500, checkpoint_every=1_000)))


def get_config(preset=None):
  return ex.select(__file__, preset, {None: s4, "s5": s5, "s4d": s4d, "cpu": cpu})
