"""DNA language modelling on your own FASTA files.

  python -m ssm train --config experiments/own_data/fasta_dna.py[:preset] --config.data.path=P

P: a .fa / .fasta / .fna file (gzip if it ends in .gz) or a folder of them. Bases A C G T N
(either case) are tokens 2..6, other IUPAC codes count as N (reported), records are joined by a
boundary token (ssm.data.fasta). Records are split by a hash of their id (5% validation, 5%
test). The model reads windows of data.seq_len bases; evaluation reports bits per base.

Presets: "<model>-<size>" of ssm.presets (default mamba-125m, as Caduceus / HyenaDNA-style
recurrent DNA models); "cpu": the tiny Mamba on 512-base windows, 200 steps.
"""

from ssm import experiment_configs as ex


def get_config(preset=None):
  if preset == "cpu":
    return ex.byte_lm(name="dna", data=dict(name="fasta_dna"), preset="mamba-tiny", seq_len=512,
                      extrapolation=(2, 4))
  return ex.byte_lm(name="dna", data=dict(name="fasta_dna"), preset=preset or "mamba-125m",
                    seq_len=4096, extrapolation=(2, 4))
