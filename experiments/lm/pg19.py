"""Byte-level language modelling on PG-19 (28k public-domain books; TFDS `pg19`, prepared as
array_record in data.data_dir: `tfds build pg19 --data_dir DIR --file_format=array_record`).

The books of each split are joined into one byte stream (cached once under data.data_dir) and
read as windows of data.seq_len bytes; long documents make PG-19 the corpus for length
extrapolation, measured after training at 2x, 4x and 8x the training length.

Presets: "<model>-<size>" of ssm.presets (default gdn_h1-125m); "cpu": the tiny Gated DeltaNet
hybrid on 256-byte windows, 200 steps.
"""

from ssm import experiment_configs as ex


def get_config(preset=None):
  if preset == "cpu":
    return ex.byte_lm(name="lm_pg19", data=dict(name="pg19"), preset="gdn_h1-tiny", seq_len=256)
  return ex.byte_lm(name="lm_pg19", data=dict(name="pg19"), preset=preset)
