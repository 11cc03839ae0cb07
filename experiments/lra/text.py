"""LRA Text: IMDB sentiment (2 classes) from the review's UTF-8 bytes, up to 4,096 of them.
Data: TFDS `imdb_reviews` prepared as array_record in data.data_dir (see ssm.data.lra_text).
As in LRA and S4, the full configs train on all 25k training reviews and validate on the test
split (data.num_val=0); set data.num_val to hold out part of train instead.

Presets (`--config experiments/lra/text.py[:preset]`):
  (none)  S4, as the S4 repository's configs/experiment/lra/s4-imdb.yaml: 6 pre-norm layers,
          d_model 256, d_state 4, one shared SSM, bidirectional, batch 16, lr 0.01 (SSM 0.001),
          weight decay 0.05, 50k steps (32 epochs) with 5k warmup.
  s5      S5, as S5's bin/run_experiments/run_lra_imdb.sh: 6 layers, d_model 256, P = 192 in 12
          blocks, lecun_normal C, dropout 0.1, batch 50, lr 0.004 (SSM 0.001), weight decay
          0.07, 35 epochs, no warmup.
  cpu     S4D, 2 x 32, on the first 512 bytes of each review, 400 steps.
Deviations from the published setups: `ssm.experiment_configs.LRA_DEVIATIONS`.
"""

from ssm import experiment_configs as ex

DATA = dict(name="lra_text", seq_len=4096, max_length=4096, num_val=0)
TRAIN = 25_000


def s4():
  return ex.lra_s4(name="lra_text_s4", data=DATA, n_layers=6, d_model=256, d_state=4,
                   prenorm=True, dropout=0.0, batch_size=16, lr=0.01, ssm_lr=0.001,
                   weight_decay=0.05, num_steps=50_000, warmup_steps=5_000)


def s5():
  return ex.lra_s5(name="lra_text_s5", data=DATA, n_layers=6, d_model=256, d_state=192,
                   blocks=12, c_init="lecun_normal", dropout=0.1, batch_size=50, lr=0.004,
                   ssm_lr=0.001, weight_decay=0.07, num_steps=ex.steps(35, TRAIN, 50),
                   warmup_steps=0)


def cpu():
  return ex.cpu_preset(s4(), data=dict(seq_len=512, max_length=512, num_val=500))


def get_config(preset=None):
  return ex.select(__file__, preset, {None: s4, "s5": s5, "cpu": cpu})
