"""Selective copying (Mamba; Gu & Dao 2023): 16 data tokens scattered among noise in a 4096-long
sequence; after the markers the model must output them in order. Data: generated
(ssm.data.recall_tasks, task "selective_copying").

  python -m ssm train --config experiments/synthetic/selective_copying.py:<mixer>

mixer: attention, swa, mamba, mamba2, gated_deltanet, hyena, s4d. Two blocks, d_model 64.
"""

from ssm import experiment_configs as ex


def get_config(mixer=None):
  return ex.recall(name="selective_copying", data=dict(name="selective_copying"),
                   mixer=mixer or "mamba", length=4096, d_model=64, batch_size=8)
