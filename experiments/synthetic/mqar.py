"""Multi-query associative recall (Zoology; Arora et al. 2023): a sequence of key-value pairs,
then keys queried again (gaps drawn from a power law); the model must output each queried key's
value. Accuracy is over the queried positions. Data: generated (ssm.data.recall_tasks, task
"mqar"): vocabulary 8192, 100k training sequences.

  python -m ssm train --config experiments/synthetic/mqar.py:ARG
  ARG = <mixer>[,<length>x<pairs>][,d<d_model>][,lr<lr>]

e.g. `mqar.py:mamba,256x16,d256,lr3e-4`. mixer: attention, swa, mamba, mamba2, gated_deltanet,
hyena, s4d (ssm.experiment_configs.recall_mixers); (length, pairs): one of Zoology's 64x4
(default), 128x8, 256x16, 512x64. Two pre-norm blocks (mixer + MLP), d_model 128 and lr 1e-3 by
default, batch 64, 10k steps. experiments/synthetic/sweep.py runs mixer x d_model x lr.
"""

from ssm import experiment_configs as ex
from ssm.data import recall

SETTINGS = {f"{length}x{pairs}": (length, pairs) for length, pairs in recall.MQAR_SETTINGS}


def get_config(arg=None):
  mixer, *options = (arg or "attention").split(",")
  setting, kwargs = "64x4", {}
  for option in options:
    if option in SETTINGS:
      setting = option
    elif option.startswith("d") and option[1:].isdigit():
      kwargs["d_model"] = int(option[1:])
    elif option.startswith("lr"):
      kwargs["lr"] = float(option[2:])
    else:
      raise ValueError(f"mqar.py: cannot read {option!r} of {arg!r} (expected one of "
                       f"{', '.join(SETTINGS)}, d<d_model> or lr<learning rate>)")
  length, pairs = SETTINGS[setting]
  return ex.recall(name=f"mqar_{setting}",
                   data=dict(name="mqar", length=length, num_pairs=pairs), mixer=mixer,
                   length=length, **kwargs)
