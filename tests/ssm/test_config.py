"""Config loading, overrides and validation: every error names its field."""

from __future__ import annotations

import pytest

from ssm import config as config_lib

LISTOPS = "experiments/lra/listops.py"


@pytest.mark.parametrize("path", [LISTOPS + ":s4d", LISTOPS + ":cpu"])
def test_experiment_configs_validate(path):
  config = config_lib.load_config_file(path)
  config_lib.validate(config, num_devices=1)
  assert config_lib.pattern_of(config.model) == ("s4d",) * config.model.n_layers


def test_preset_keeps_unmentioned_mixer_settings():
  cpu = config_lib.load_config_file(LISTOPS + ":cpu")
  assert cpu.model.mixers.s4d.d_state == 32  # set by the preset
  assert cpu.model.mixers.s4d.bidirectional is True  # inherited from the published setting


def test_unknown_preset_and_missing_file():
  with pytest.raises(ValueError, match="unknown preset 'gpu9'.*known: s5, s4d, cpu"):
    config_lib.load_config_file(LISTOPS + ":gpu9")
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_lib.load_config_file("experiments/nope.py")


@pytest.mark.parametrize("overrides, field, text", [
    (["model.pattern='s4d,mamba9'"], "model.pattern", "unknown mixer 'mamba9'"),
    (["model.pattern='s4d,'"], "model.pattern", "empty entry"),
    (["model.n_layers=3", "model.pattern='s4d,s4d'"], "model.n_layers", "cannot repeat the pattern"),
    (["model.d_model=0"], "model.d_model", "positive integer"),
    (["model.pool='max'"], "model.pool", "'max' is not one of"),
    (["model.mixers.s4d.d_sate=4"], "model.mixers.s4d.d_sate", "S4D has no such argument"),
    (["data.batch_size=30"], "data.batch_size", "does not divide over the 8 devices"),
    (["optim.warmup_steps=5000", "train.num_steps=100"], "optim.warmup_steps", "must be in [0, train.num_steps"),
    (["optim.lr=-1.0"], "optim.lr", "must be >= 0"),
    # A language model with a mixer that reads ahead.
    (["model.task='lm'"], "model.mixers.s4d.bidirectional", "bidirectional=True reads later"),
    (["model.task='lm'", "model.mixers.s4d.bidirectional=False", "model.pattern='s4d,attn'",
      "model.n_layers=2", "model.mixers.attn={'type': 'attention', 'causal': False}"],
     "model.mixers.attn.causal", "causal=False reads later tokens"),
])
def test_bad_fields_are_named(overrides, field, text):
  config = config_lib.load_config_file(LISTOPS + ":cpu")
  config_lib.apply_overrides(config, overrides)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=8)
  assert err.value.field == field
  assert f"config field '{field}'" in str(err.value)
  assert text in str(err.value)


def test_overrides_parse_literals_and_reject_unknown_fields():
  config = config_lib.load_config_file(LISTOPS + ":cpu")
  config_lib.apply_overrides(config, ["model.d_model=96", "optim.lr=1", "model.prenorm=True",
                                      "data.name=lra_listops", "model.mixers.s4d.a_init='inv'"])
  assert config.model.d_model == 96 and config.model.prenorm is True
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  assert config.model.mixers.s4d.a_init == "inv"
  with pytest.raises(config_lib.ConfigError, match="'model.d_modle'.*unknown field"):
    config_lib.apply_overrides(config, ["model.d_modle=3"])
  with pytest.raises(config_lib.ConfigError, match="'modle'.*unknown section"):
    config_lib.apply_overrides(config, ["modle.d_model=3"])
  with pytest.raises(config_lib.ConfigError, match="'model.d_model'.*cannot set 'big'"):
    config_lib.apply_overrides(config, ["model.d_model=big"])
  with pytest.raises(config_lib.ConfigError, match="not of the form field=value"):
    config_lib.apply_overrides(config, ["model.d_model"])


def test_build_rejects_unknown_sections_and_fields():
  with pytest.raises(config_lib.ConfigError, match="'model.n_layer'.*unknown field"):
    config_lib.build(model=dict(n_layer=3))
  with pytest.raises(config_lib.ConfigError, match="'model'.*expected a section"):
    config_lib.build(model=3)


def test_pattern_entries_name_their_mixer_type_and_mlp():
  config = config_lib.build(model=dict(
      pattern="rec,rec,swa", n_layers=6, mlp_ratio=2,
      mixers=dict(rec=dict(type="s4d", d_state=8, mlp_ratio=0), swa=dict(type="s5"))))
  config_lib.validate(config)
  assert config_lib.pattern_of(config.model) == ("s4d", "s4d", "s5") * 2
  from ssm import model as model_lib
  specs = model_lib.layer_specs(config.model)
  assert [(s.name, s.mixer, s.mlp_ratio) for s in specs] == [
      ("rec", "s4d", 0), ("rec", "s4d", 0), ("swa", "s5", 2)]
  assert dict(specs[0].mixer_kwargs) == {"d_state": 8}
  config.model.mixers.swa.type = "nope"
  with pytest.raises(config_lib.ConfigError, match="model.mixers.swa.type.*unknown mixer 'nope'"):
    config_lib.validate(config)
