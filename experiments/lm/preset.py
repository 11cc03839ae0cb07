"""The model presets of `ssm.presets` as experiment configs:
`--config experiments/lm/preset.py:<name>-<size>`, e.g.
`python -m ssm info --config experiments/lm/preset.py:gdn_h1-350m`.

Names: transformer, mamba, mamba2_hybrid, gdn_h1, samba, griffin, hyena;
sizes: tiny, 125m, 350m, 1.3b.
Only the model section is set here: the data section is the default (ListOps) until the LM corpora
exist, so these configs are for `info` and for the hybrid-model tests.
"""

from ssm import config as config_lib
from ssm import presets


def get_config(arg=None):
  name, _, size = (arg or "transformer-tiny").rpartition("-")
  if not name:
    raise ValueError(f"preset {arg!r}: expected <name>-<size>, e.g. gdn_h1-125m (names: "
                     f"{', '.join(presets.PRESETS)}; sizes: {', '.join(presets.SIZES)})")
  return config_lib.build(name=f"lm_{name}_{size}", model=presets.model_preset(name, size),
                          data=dict(seq_len=256, batch_size=8, eval_batch_size=8))
