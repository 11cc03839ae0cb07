"""LRA Path-X: Pathfinder at 128 x 128 (16,384 pixels per sequence, continuous in [-1, 1]).
Data: the LRA release (lra_release/pathfinder128/curv_contour_length_14/...) when data.manual_dir
names the lra_release folder, else the clean-room generator at 128 x 128, "hard"; split 80/10/10.

Presets (`--config experiments/lra/pathx.py[:preset]`):
  (none)  S4, as the S4 repository's configs/experiment/lra/s4-pathx.yaml: 6 pre-norm layers,
          d_model 256, d_state 64, one SSM per channel, dt in [1e-4, 1e-1], bidirectional,
          batch 16, lr 0.002 (SSM 0.001), weight decay 0.05, 500k steps (50 epochs) with 50k
          warmup.
  s5      S5, as S5's bin/run_experiments/run_lra_pathx.sh: 6 layers, d_model 128, P = 256 in 16
          blocks, complex_normal C, dt_min 1e-4, batch 32, lr 0.0018 (SSM 0.0006), weight decay
          0.06, 75 epochs with 1 epoch of warmup.
  cpu     S4D, 2 x 32, on 400 generated 128 x 128 "easy" images, 100 steps: a smoke run of the
          16k-long pipeline, not a learning curve.
Deviations from the published setups: `ssm.experiment_configs.LRA_DEVIATIONS`.
"""

from ssm import experiment_configs as ex

DATA = dict(name="lra_pathfinder", size=128, difficulty="hard", seq_len=16_384)
TRAIN = 160_000


def s4():
  return ex.lra_s4(name="lra_pathx_s4", data=DATA, n_layers=6, d_model=256, d_state=64,
                   prenorm=True, dropout=0.0, batch_size=16, lr=0.002, ssm_lr=0.001,
                   weight_decay=0.05, num_steps=500_000, warmup_steps=50_000, dt_min=1e-4,
                   n_ssm=None, continuous=True)


def s5():
  return ex.lra_s5(name="lra_pathx_s5", data=DATA, n_layers=6, d_model=128, d_state=256,
                   blocks=16, c_init="complex_normal", dropout=0.0, batch_size=32, lr=0.0018,
                   ssm_lr=0.0006, weight_decay=0.06, num_steps=ex.steps(75, TRAIN, 32),
                   warmup_steps=ex.steps(1, TRAIN, 32), dt_min=1e-4, continuous=True)


def cpu():
  return ex.cpu_preset(s4(), data=dict(difficulty="easy", num_train=400, num_val=50,
                                       num_test=50), num_steps=100, batch_size=8)


def get_config(preset=None):
  return ex.select(__file__, preset, {None: s4, "s5": s5, "cpu": cpu})
