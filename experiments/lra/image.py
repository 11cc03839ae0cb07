"""LRA Image: CIFAR-10 classes from the 1,024 grayscale pixels of a 32 x 32 image, read row by
row as continuous values in [-1, 1] (as S4; data.pixels="tokens" gives LRA's 256-token form).
Data: TFDS `cifar10` prepared as array_record in data.data_dir (ssm.data.lra_image); 5k training
images are held out for validation (45k train), as in S4.

Presets (`--config experiments/lra/image.py[:preset]`):
  (none)  S4, as the S4 repository's configs/experiment/lra/s4-cifar.yaml: 6 post-norm layers,
          d_model 512, d_state 64, bidirectional, dropout 0.1, batch 50, lr 0.01 (SSM 0.001),
          weight decay 0.05, 180k steps (200 epochs) with 18k warmup.
  s5      S5, as S5's bin/run_experiments/run_lra_cifar.sh: 6 layers, d_model 512, P = 384 in 3
          blocks, lecun_normal C, dropout 0.1, batch 50, lr 0.0045 (SSM 0.001), weight decay
          0.07, 250 epochs with 1 epoch of warmup.
  cpu     S4D, 2 x 32, on the full 1,024-pixel images, 400 steps.
Deviations from the published setups: `ssm.experiment_configs.LRA_DEVIATIONS`.
"""

from ssm import experiment_configs as ex

DATA = dict(name="lra_image", seq_len=1024, num_val=5_000)
TRAIN = 45_000


def s4():
  return ex.lra_s4(name="lra_image_s4", data=DATA, n_layers=6, d_model=512, d_state=64,
                   prenorm=False, dropout=0.1, batch_size=50, lr=0.01, ssm_lr=0.001,
                   weight_decay=0.05, num_steps=180_000, warmup_steps=18_000, continuous=True)


def s5():
  return ex.lra_s5(name="lra_image_s5", data=DATA, n_layers=6, d_model=512, d_state=384,
                   blocks=3, c_init="lecun_normal", dropout=0.1, batch_size=50, lr=0.0045,
                   ssm_lr=0.001, weight_decay=0.07, num_steps=ex.steps(250, TRAIN, 50),
                   warmup_steps=ex.steps(1, TRAIN, 50), continuous=True)


def cpu():
  return ex.cpu_preset(s4(), data={})


def get_config(preset=None):
  return ex.select(__file__, preset, {None: s4, "s5": s5, "cpu": cpu})
