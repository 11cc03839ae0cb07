"""Byte-level language modelling on a folder of your own text files.

  python -m ssm train --config experiments/lm/text_folder.py[:preset] --config.data.path=DIR

Data (ssm.data.lm_bytes, task "text_folder"): every file under DIR matching data.glob
("**/*.txt"), one document each, as UTF-8 bytes (258 tokens: padding, a document boundary, 256
bytes); split by file, deterministically, by a hash of its relative path (data.val_fraction /
data.test_fraction, 5% each), so adding files never moves old ones. Training reads consecutive
windows of data.seq_len bytes; evaluation reports loss, bits per byte and perplexity; after
training the validation loss is measured by position at 2x, 4x and 8x the training length
(extrapolation.json / extrapolation.png in the run directory).

Presets: "<model>-<size>" of ssm.presets (default gdn_h1-125m: Gated DeltaNet + sliding-window
attention), e.g. mamba-125m, transformer-350m; "cpu": the tiny Gated DeltaNet hybrid on 256-byte
windows, 200 steps.
"""

from ssm import experiment_configs as ex


def get_config(preset=None):
  if preset == "cpu":
    return ex.byte_lm(name="lm_text_folder", data=dict(name="text_folder"), preset="gdn_h1-tiny",
                      seq_len=256)
  return ex.byte_lm(name="lm_text_folder", data=dict(name="text_folder"), preset=preset)
