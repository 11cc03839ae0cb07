"""LRA ListOps with an S4D stack.

Default: the published S4 ListOps setting (Gu et al., S4 repo `s4-lra-listops`): 8 post-norm layers,
d_model 128, d_state 64, bidirectional, dt in [1e-3, 1e-1], GLU output, mean pooling, batch 50,
AdamW lr 0.01 / weight decay 0.05 with SSM parameters (A, B, log dt) at lr 0.001 and no decay,
40 epochs of the 96k training examples (76,800 steps). Deviations: LayerNorm instead of BatchNorm
(the codebase has no BatchNorm), warmup + cosine instead of the repo's plateau schedule, and the
S4D-Lin diagonal SSM (the S4D paper's ListOps model) rather than the DPLR S4 kernel.
The LRA release files are read from `data.manual_dir` when given, else the data is generated.

Presets (`--config experiments/lra/listops.py:cpu`):
  cpu   a laptop-sized run on short generated expressions (the `make demo` job): a few minutes on 2 cores.
"""

from ssm import config as config_lib


def get_config(preset=None):
  config = config_lib.build(
      name="lra_listops",
      model=dict(
          task="classify", input="tokens", d_model=128, n_layers=8, pattern="s4d", norm="layer", prenorm=False,
          dropout=0.0, pool="mean",
          mixers=dict(s4d=dict(d_state=64, a_init="lin", dt_min=1e-3, dt_max=1e-1, bidirectional=True))),
      data=dict(name="lra_listops", seq_len=2048, batch_size=50, eval_batch_size=50, num_train=96_000,
                num_val=2_000, num_test=2_000, min_length=500, max_length=2_000, max_depth=10, max_args=10),
      optim=dict(lr=0.01, ssm_lr=0.001, weight_decay=0.05, warmup_steps=2_000, schedule="cosine", grad_clip=0.0),
      train=dict(num_steps=76_800, log_every=100, eval_every=1_920, checkpoint_every=1_920),
  )
  if preset is None:
    return config
  if preset == "cpu":
    return config_lib.merge(config, dict(
        model=dict(d_model=64, n_layers=4, mixers=dict(s4d=dict(d_state=32))),
        data=dict(seq_len=128, batch_size=32, eval_batch_size=128, num_train=20_000, num_val=1_000,
                  num_test=1_000, min_length=10, max_length=128, max_depth=4, max_args=5),
        optim=dict(lr=0.004, ssm_lr=0.001, warmup_steps=100),
        train=dict(num_steps=3_000, log_every=50, eval_every=500, checkpoint_every=1_000),
    ))
  raise ValueError(f"unknown preset {preset!r} for experiments/lra/listops.py (known: cpu)")
