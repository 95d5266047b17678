"""Training recipes: the bundled ones load, bad fields are refused with errors naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain.recipes import bundled_recipes, load_recipe, parse_recipe
from schemas.errors import ConfigError


def test_bundled_recipes_load_with_lora_and_gate_thresholds() -> None:
    assert {"dpo", "sft"} <= set(bundled_recipes())
    dpo, sft = load_recipe("dpo"), load_recipe("sft")
    assert (dpo.method, sft.method) == ("dpo", "sft")
    assert dpo.name == "dpo" and dpo.lora.r > 0 and "q_proj" in dpo.lora.target_modules
    assert dpo.gate.min_preference_accuracy == 0.9
    assert dpo.hyperparameters()["lora"]["alpha"] == dpo.lora.alpha


def test_overrides_apply_and_are_validated() -> None:
    assert load_recipe("dpo", epochs=2, save_steps=3).epochs == 2
    with pytest.raises(ConfigError, match="epochs"):
        load_recipe("dpo", epochs=-1)


@pytest.mark.parametrize(("data", "field"), [
    ({"method": "ppo"}, "method"),
    ({"method": "dpo", "lora": {"r": 0}}, "lora.r"),
    ({"method": "dpo", "lora": {"target_modules": []}}, "lora"),
    ({"method": "dpo", "learning_rate": 0}, "learning_rate"),
    ({"method": "dpo", "batch_size": 0}, "batch_size"),
    ({"method": "dpo", "beta": -0.1}, "beta"),
    ({"method": "dpo", "gate": {"min_preference_accuracy": 1.5}}, "gate.min_preference_accuracy"),
    ({"method": "dpo", "gate": {"max_new_tokens": 300}, "max_length": 256}, "max_new_tokens"),
    ({"method": "dpo", "lr": 0.1}, "lr"),
    ({}, "method"),
])
def test_invalid_recipes_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_recipe(data, source="my.yaml")
    assert "my.yaml" in e.value.message and field in e.value.message
    assert e.value.code == "invalid_config"


def test_unknown_names_bad_yaml_and_non_mappings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'.*dpo"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [dpo\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- dpo\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(listed)
    good = tmp_path / "mine.yaml"
    good.write_text("method: sft\nepochs: 3\n")
    assert load_recipe(good).name == "mine" and load_recipe(good).epochs == 3
