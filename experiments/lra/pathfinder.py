"""LRA Pathfinder: whether the two circle markers of a 32 x 32 image lie on the same dashed
path (2 classes), from its 1,024 pixels read row by row as continuous values in [-1, 1] (as
S4). Data: the LRA release (lra_release/pathfinder32/curv_contour_length_14/...) when
data.manual_dir names the lra_release folder, else the clean-room generator at the "hard"
difficulty (paths of 14 dashes); either way split 80/10/10 (ssm.data.lra_pathfinder).

Presets (`--config experiments/lra/pathfinder.py[:preset]`):
  (none)  S4, as the S4 repository's configs/experiment/lra/s4-pathfinder.yaml: 6 pre-norm
          layers, d_model 256, d_state 64, one SSM per channel, bidirectional, batch 64, lr
          0.004 (SSM 0.001), weight decay 0.05, 500k steps (200 epochs) with 50k warmup.
  s5      S5, as S5's bin/run_experiments/run_lra_pathfinder.sh: 6 layers, d_model 192, P = 256
          in 8 blocks, trunc_standard_normal C, dropout 0.05, batch 64, lr 0.0045 (SSM 0.0009),
          weight decay 0.03, 200 epochs with 1 epoch of warmup.
  cpu     S4D, 2 x 32, on 2,000 generated "easy" images (paths of 6 dashes), 400 steps.
Deviations from the published setups: `ssm.experiment_configs.LRA_DEVIATIONS`.
"""

from ssm import experiment_configs as ex

DATA = dict(name="lra_pathfinder", size=32, difficulty="hard", seq_len=1024)
TRAIN = 160_000


def s4():
  return ex.lra_s4(name="lra_pathfinder_s4", data=DATA, n_layers=6, d_model=256, d_state=64,
                   prenorm=True, dropout=0.0, batch_size=64, lr=0.004, ssm_lr=0.001,
                   weight_decay=0.05, num_steps=500_000, warmup_steps=50_000, n_ssm=None,
                   continuous=True)


def s5():
  return ex.lra_s5(name="lra_pathfinder_s5", data=DATA, n_layers=6, d_model=192, d_state=256,
                   blocks=8, c_init="trunc_standard_normal", dropout=0.05, batch_size=64,
                   lr=0.0045, ssm_lr=0.0009, weight_decay=0.03,
                   num_steps=ex.steps(200, TRAIN, 64), warmup_steps=ex.steps(1, TRAIN, 64),
                   continuous=True)


def cpu():
  return ex.cpu_preset(s4(), data=dict(difficulty="easy", num_train=2_000, num_val=200,
                                       num_test=200))


def get_config(preset=None):
  return ex.select(__file__, preset, {None: s4, "s5": s5, "cpu": cpu})
