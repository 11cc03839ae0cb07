"""Every experiment file: its configs validate, each LRA / LM / own-data `cpu` preset trains a few
steps through `python -m ssm train` (in-process, at test sizes) and its training loss goes down,
MQAR is learnable by a 2-layer attention model, and the recall sweep runs and reports.

Datasets that need a download are replaced by small learnable stand-ins: TFDS `mock_data` for
imdb_reviews / cifar10 / pg19 / lm1b, and files the tests write for the retrieval TSVs, text
folders, FASTA and npz arrays.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssm import __main__ as cli
from ssm import config as config_lib
from ssm import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
SHORT = ["--config.train.num_steps=40", "--config.train.log_every=10",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
         "--config.optim.warmup_steps=4", "--config.train.progress_bar=False"]


def train(tmp_path, config: str, *overrides: str) -> tuple[list[float], pathlib.Path]:
  """Runs `python -m ssm train` in this process; returns the logged training losses and the run
  directory."""
  workdir = tmp_path / "run"
  argv = ["train", "--config", str(EXPERIMENTS / config), "--workdir", str(workdir),
          f"--config.data.data_dir={tmp_path / 'data'}", *SHORT, *overrides]
  assert cli.main(argv) == 0
  records = metrics.read_jsonl(workdir / metrics.JSONL_NAME)
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses) == 4 and all(np.isfinite(losses)), losses
  return losses, workdir


def assert_learns(losses: list[float], factor: float = 0.9) -> None:
  """The last logged window's mean training loss is below `factor` x the first one's."""
  assert losses[-1] < factor * losses[0], losses


def test_every_experiment_file_and_preset_validates():
  files = {
      "lra/listops.py": [None, "s5", "s4d", "cpu"], "lra/text.py": [None, "s5", "cpu"],
      "lra/retrieval.py": [None, "s5", "cpu"], "lra/image.py": [None, "s5", "cpu"],
      "lra/pathfinder.py": [None, "s5", "cpu"], "lra/pathx.py": [None, "s5", "cpu"],
      "lm/text_folder.py": [None, "cpu", "mamba-350m"], "lm/pg19.py": [None, "cpu"],
      "lm/lm1b.py": [None, "cpu"], "lm/preset.py": ["samba-125m"],
      "own_data/fasta_dna.py": [None, "cpu"],
      "own_data/npz_classification.py": [None, "s5", "mamba"],
      "synthetic/mqar.py": [f"{m},{s}" for m in ("attention", "swa", "mamba", "mamba2",
                                              "gated_deltanet", "hyena", "s4d")
                         for s in ("64x4", "512x64")],
      "synthetic/selective_copying.py": [None], "synthetic/induction_heads.py": [None, "attention"],
  }
  listed = {str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.py")} - {
      "synthetic/sweep.py"}
  assert listed == set(files), "every experiment file is checked here"
  for name, presets in files.items():
    for preset in presets:
      config = config_lib.load_config_file(f"{EXPERIMENTS / name}{':' + preset if preset else ''}")
      config_lib.validate(config)
  s4 = config_lib.load_config_file(str(EXPERIMENTS / "lra/text.py"))
  assert (s4.model.n_layers, s4.model.d_model, s4.model.mixers.s4.d_state) == (6, 256, 4)
  assert (s4.data.batch_size, s4.optim.lr, s4.optim.ssm_lr, s4.train.num_steps) == (
      16, 0.01, 0.001, 50_000)
  s5 = config_lib.load_config_file(f"{EXPERIMENTS / 'lra/pathx.py'}:s5")
  assert (s5.model.mixers.s5.d_state, s5.model.mixers.s5.blocks, s5.optim.lr) == (256, 16, 0.0018)
  assert s5.train.num_steps == 75 * 160_000 // 32
  with pytest.raises(ValueError, match="known: s5, cpu"):
    config_lib.load_config_file(f"{EXPERIMENTS / 'lra/image.py'}:s6")


# --- LRA ---------------------------------------------------------------------------------------

def test_listops_cpu_preset_learns(tmp_path, capsys):
  """Also what every run writes: result.json, curves.png, TensorBoard events, the summary line."""
  losses, workdir = train(tmp_path, "lra/listops.py:cpu", "--config.data.num_train=320",
                          "--config.data.num_val=32", "--config.data.num_test=32",
                          "--config.data.max_length=64", "--config.data.seq_len=64",
                          "--config.train.checkpoint_every=20")
  assert_learns(losses)
  result = json.loads((workdir / "result.json").read_text())
  assert result["step"] == 40 and result["test"]["examples"] == 32
  assert "test accuracy" in capsys.readouterr().out and result["majority_rate"] > 0
  assert (workdir / "curves.png").stat().st_size > 1000
  assert list((workdir / "tensorboard").iterdir())
  assert (workdir / "checkpoints").is_dir()


def _reviews(n):
  words = {1: "a wonderful , great film that I loved", 0: "an awful , boring film that I hated"}
  return [{"text": f"review {i}: {words[i % 2]}".encode(), "label": np.int64(i % 2)}
          for i in range(n)]


def test_text_cpu_preset_learns(tmp_path):
  fake = {"train": _reviews(64), "test": _reviews(16)}
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: fake[split]):
    losses, workdir = train(tmp_path, "lra/text.py:cpu", "--config.data.num_val=8",
                            "--config.data.seq_len=64", "--config.data.max_length=64")
  assert_learns(losses, 0.7)
  assert json.loads((workdir / "result.json").read_text())["test"]["accuracy"] > 0.9


def test_retrieval_cpu_preset_learns_two_tower(tmp_path):
  manual = tmp_path / "aan"
  manual.mkdir()
  topics = ["state space models", "protein folding", "machine translation", "speech codecs"]
  for split, n in (("train", 64), ("eval", 8), ("test", 8)):
    rows = []
    for i in range(n):
      same = i % 2
      a, b = topics[i % 4], topics[(i % 4) if same else (i + 1) % 4]
      rows.append(f"{same}\t{split}{i}a\t{split}{i}b\tpaper on {a}\tanother paper on {b}")
    (manual / f"new_aan_pairs.{split}.tsv").write_text("\n".join(rows) + "\n")
  losses, workdir = train(tmp_path, "lra/retrieval.py:cpu", f"--config.data.manual_dir={manual}",
                          "--config.data.seq_len=32", "--config.data.max_length=32")
  assert_learns(losses, 0.5)
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["task"] == "retrieval"


def _images(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    label = i % 10
    image = np.clip(label * 25 + rng.integers(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    out.append({"image": image, "label": np.int64(label)})
  return out


def test_image_cpu_preset_learns(tmp_path):
  fake = {"train": _images(80, 0), "test": _images(20, 1)}
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: fake[split]):
    losses, _ = train(tmp_path, "lra/image.py:cpu", "--config.data.num_val=10",
                      "--config.optim.lr=0.01")
  assert_learns(losses, 0.5)


def test_pathfinder_cpu_preset_learns(tmp_path):
  losses, _ = train(tmp_path, "lra/pathfinder.py:cpu", "--config.data.num_train=64",
                    "--config.data.num_val=16", "--config.data.num_test=16")
  assert_learns(losses, 0.97)


def test_pathx_cpu_preset_trains_on_16k_sequences(tmp_path):
  losses, workdir = train(tmp_path, "lra/pathx.py:cpu", "--config.data.num_train=16",
                          "--config.data.num_val=4", "--config.data.num_test=4",
                          "--config.data.batch_size=4", "--config.data.eval_batch_size=4",
                          "--config.train.num_steps=12", "--config.train.log_every=3")
  assert_learns(losses, 1.0)
  assert json.loads((workdir / "config.json").read_text())["data"]["seq_len"] == 16_384


# --- language modelling ------------------------------------------------------------------------

LM_SHORT = ["--config.data.seq_len=64", "--config.train.extrapolation=(2,)",
            "--config.train.extrapolation_examples=4", "--config.data.eval_examples=8",
            "--config.data.batch_size=8"]
TEXT = "the quick brown fox jumps over the lazy dog. " * 30


def check_extrapolation(workdir: pathlib.Path) -> None:
  record = json.loads((workdir / "extrapolation.json").read_text())
  assert record["train_length"] == 64 and set(record["lengths"]) == {"64", "128"}
  curve = record["lengths"]["128"]["per_position"]
  assert len(curve) == 127 and np.all(np.isfinite(curve))
  assert (workdir / "extrapolation.png").stat().st_size > 0


def test_text_folder_cpu_preset_learns_and_extrapolates(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(8):
    (corpus / f"doc{i}.txt").write_text(f"document {i}: " + TEXT)
  losses, workdir = train(tmp_path, "lm/text_folder.py:cpu", f"--config.data.path={corpus}",
                          "--config.data.val_fraction=0.25", "--config.data.test_fraction=0.25",
                          *LM_SHORT)
  assert_learns(losses, 0.7)
  result = json.loads((workdir / "result.json").read_text())
  assert result["test"]["bits_per_byte"] == pytest.approx(result["test"]["loss"] / np.log(2))
  check_extrapolation(workdir)


@pytest.mark.parametrize("corpus,feature", [("pg19", "book_text"), ("lm1b", "text")])
def test_tfds_corpus_cpu_preset_learns(tmp_path, corpus, feature):
  docs = {s: [f"{s} text {i}: {TEXT}" for i in range(6)] for s in ("train", "validation", "test")}
  fake = lambda self, split, **kw: [{feature: d.encode()} for d in docs[split]]
  with tfds.testing.mock_data(as_data_source_fn=fake):
    losses, workdir = train(tmp_path, f"lm/{corpus}.py:cpu", *LM_SHORT)
  assert_learns(losses, 0.7)
  check_extrapolation(workdir)


# --- users' own data ---------------------------------------------------------------------------

def test_fasta_cpu_preset_learns(tmp_path):
  rng = np.random.default_rng(0)
  motif = "ACGTTGCA"
  lines = []
  for i in range(12):
    seq = "".join(motif if rng.random() < 0.8 else rng.choice(list("ACGT")) for _ in range(60))
    lines += [f">chr{i} sample", seq[:240], seq[240:]]
  (tmp_path / "genome.fa").write_text("\n".join(lines) + "\n")
  losses, _ = train(tmp_path, "own_data/fasta_dna.py:cpu",
                    f"--config.data.path={tmp_path / 'genome.fa'}",
                    "--config.data.val_fraction=0.25", "--config.data.test_fraction=0.25",
                    *LM_SHORT)
  assert_learns(losses, 0.7)


def test_npz_classification_learns(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 128), ("test", 32)):
    x = rng.integers(0, 8, (n, 24))
    y = rng.integers(0, 2, n)
    x[y == 1, rng.integers(0, 24)] = 9  # class 1: a 9 somewhere
    np.savez(tmp_path / f"{split}.npz", x=x, y=y)
  losses, workdir = train(tmp_path, "own_data/npz_classification.py",
                          f"--config.data.train_file={tmp_path / 'train.npz'}",
                          f"--config.data.test_file={tmp_path / 'test.npz'}",
                          "--config.data.seq_len=24", "--config.model.d_model=32",
                          "--config.model.n_layers=2", "--config.data.batch_size=16",
                          "--config.model.dropout=0.0", "--config.optim.lr=0.01")
  assert_learns(losses, 0.8)
  assert json.loads((workdir / "result.json").read_text())["test"]["examples"] == 32


# --- synthetic recall --------------------------------------------------------------------------

def test_mqar_is_learnable_by_two_layer_attention(tmp_path):
  """Zoology's (64, 4) setting with a 64-token vocabulary: a 2-layer attention model must recall
  > 90% of the queried values on held-out sequences."""
  _, workdir = train(tmp_path, "synthetic/mqar.py:attention,64x4,d64,lr3e-3",
                     "--config.data.vocab=64", "--config.data.num_train=4000",
                     "--config.data.num_val=256", "--config.data.num_test=256",
                     "--config.data.batch_size=32", "--config.train.num_steps=500",
                     "--config.train.log_every=125", "--config.optim.warmup_steps=25")
  result = json.loads((workdir / "result.json").read_text())
  assert result["test"]["targets"] == 256 * 4  # every query position of every test sequence
  assert result["test"]["accuracy"] > 0.9, result["test"]


def test_recall_sweep_trains_every_combination_and_reports(tmp_path):
  out = tmp_path / "sweep"
  command = [sys.executable, str(EXPERIMENTS / "synthetic/sweep.py"), "--mixers", "s4d",
             "--d-models", "16", "--lrs", "1e-3,3e-3", "--out", str(out),
             "--config.train.num_steps=3", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
             "--config.optim.warmup_steps=1", "--config.data.num_train=64",
             "--config.data.num_val=8", "--config.data.num_test=8",
             f"--config.data.data_dir={tmp_path / 'data'}"]
  done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  table = (out / "report" / "report.md").read_text()
  for lr in ("0.001", "0.003"):
    assert f"mqar_64x4_s4d_d16_lr{lr}" in table
  again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert again.stdout.count("finished earlier, skipped") == 2
