"""Byte-level language modelling on the One Billion Word benchmark (TFDS `lm1b`, prepared as
array_record in data.data_dir: `tfds build lm1b --data_dir DIR --file_format=array_record`).

Sentences are joined with a boundary token into one byte stream per split (validation: 10k
sentences held out of train, as lm1b has none) and read as windows of data.seq_len bytes.
Sentences are short, so the default window is 512 bytes.

Presets: "<model>-<size>" of ssm.presets (default gdn_h1-125m); "cpu": the tiny Gated DeltaNet
hybrid on 256-byte windows, 200 steps.
"""

from ssm import experiment_configs as ex


def get_config(preset=None):
  if preset == "cpu":
    return ex.byte_lm(name="lm_lm1b", data=dict(name="lm1b"), preset="gdn_h1-tiny", seq_len=256)
  return ex.byte_lm(name="lm_lm1b", data=dict(name="lm1b"), preset=preset, seq_len=512)
