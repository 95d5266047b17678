"""Which recipe a trigger trains with: a monitor names the method's recipe, the settings map it to a file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from retrain.recipes import load_recipe
from retrain.settings import RetrainSettings
from retrain.worker import RetrainWorker
from schemas.events import RetrainTrigger


def _worker(tmp_path: Path, recipes: dict[str, str]) -> RetrainWorker:
    return RetrainWorker(None, None, RetrainSettings(work_dir=tmp_path, recipes=recipes))  # type: ignore[arg-type]


def test_a_monitor_trigger_naming_dpo_gets_the_recipe_file_the_settings_map_dpo_to(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({**load_recipe("dpo").model_dump(mode="json", exclude={"name"}), "epochs": 3.0}))
    trigger = RetrainTrigger(model="m", method="dpo", params=json.dumps({"recipe": "dpo"}))  # as the monitors write it

    assert _worker(tmp_path, {"dpo": str(mine)}).recipe_for(trigger).epochs == 3.0
    assert _worker(tmp_path, {"dpo": "dpo"}).recipe_for(trigger).epochs == load_recipe("dpo").epochs  # the default
    bare = RetrainTrigger(model="m", method="dpo")
    assert _worker(tmp_path, {"dpo": str(mine)}).recipe_for(bare).epochs == 3.0
