"""Sequence classification on your own arrays.

  python -m ssm train --config experiments/own_data/npz_classification.py[:preset] \
      --config.data.train_file=train.npz --config.data.test_file=test.npz --config.data.seq_len=L

Files (ssm.data.arrays): .npz with "x" and "y" (names: data.x_key / data.y_key), or x.npy with
a sibling y.npy. x int [N, L] are token ids (model.input "tokens"); x float [N, L] / [N, L, d]
and images [N, H, W(, C)] are features (set model.input="continuous" and model.d_input=d, 1 for
[N, L] and gray images, C for colour ones). Optional "lengths" [N] mark padded sequences. The
validation split is data.val_fraction (10%) of train, or data.val_file.

Presets: (none) a 4-layer bidirectional S4D classifier, d_model 128; "s5": the same with S5;
"mamba": a 4-layer Mamba (causal, last-token pooling).
"""

from ssm import config as config_lib
from ssm import experiment_configs as ex

MIXERS = {
    None: ("s4d", dict(d_state=64, bidirectional=True), "mean"),
    "s5": ("s5", dict(d_state=64, blocks=4, bidirectional=True), "mean"),
    "mamba": ("mamba", dict(d_state=16, expand=2), "last"),
}


def get_config(preset=None):
  def build():
    pattern, settings, pool = MIXERS[preset]
    return config_lib.build(
        name=f"npz_{pattern}",
        model=dict(task="classify", input="tokens", d_model=128, n_layers=4, pattern=pattern,
                   mixers={pattern: settings}, prenorm=True, dropout=0.1, pool=pool,
                   mlp_ratio=2.0),
        data=dict(name="npz_classification", seq_len=1024, batch_size=32, eval_batch_size=64),
        optim=dict(lr=3e-3, ssm_lr=1e-3, weight_decay=0.05, warmup_steps=500),
        train=dict(num_steps=20_000, log_every=100, eval_every=1_000, checkpoint_every=1_000))
  return ex.select(__file__, preset, {k: build for k in MIXERS})
