"""Induction heads (Olsson et al. 2022; the Mamba paper's version): after the special trigger
token appears a second time, output the token that followed its first occurrence. Data:
generated (ssm.data.recall_tasks, task "induction_heads"), sequences of 256 over 20 tokens.

  python -m ssm train --config experiments/synthetic/induction_heads.py:<mixer>

mixer: attention, swa, mamba, mamba2, gated_deltanet, hyena, s4d. Two blocks, d_model 64.
"""

from ssm import experiment_configs as ex


def get_config(mixer=None):
  return ex.recall(name="induction_heads", data=dict(name="induction_heads"),
                   mixer=mixer or "mamba", length=256, d_model=64)
