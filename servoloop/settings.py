"""The one settings tree: env vars `SERVOLOOP_…` (nested with `__`) over one YAML file over defaults.

Each component declares its own section next to its code (`gateway/settings.py`, `feedback/settings.py`);
this module composes them and is the only place that reads the environment. Components receive their
section explicitly.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from feedback.graders.settings import GradingSettings
from feedback.monitors.settings import MonitorSettings
from feedback.settings import EventSettings
from gateway.settings import GatewaySettings, ModelSettings
from retrain.settings import RetrainSettings
from schemas.errors import ConfigError

CONFIG_ENV = "SERVOLOOP_CONFIG"
DEFAULT_TINY_MODEL_DIR = Path(".servoloop/models/tiny-chat")
# The YAML path for the Settings() call in progress: sources are built per call, without access to its args.
_pending_yaml_path: ContextVar[Path | None] = ContextVar("servoloop_yaml_path", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by SERVOLOOP_CONFIG (or passed to `load_settings`)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None):
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except FileNotFoundError as e:
                raise ConfigError(f"config file not found: {path}") from e
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping at the top level")
            self._data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVOLOOP_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(Path(".servoloop"), description="state of the embedded system: keys, spool, chDB, artifacts")
    log_level: str = "INFO"
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    events: EventSettings = Field(default_factory=EventSettings)
    monitors: MonitorSettings = Field(default_factory=MonitorSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    grading: GradingSettings = Field(default_factory=GradingSettings)

    _yaml_path: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls, _pending_yaml_path.get())

    def with_default_model(self) -> Settings:
        """Serve the bundled tiny model when no model is configured (the embedded default)."""
        if self.gateway.models:
            return self
        tiny = ModelSettings(name="tiny-chat", engine="auto", path=str(self.data_dir / "models" / "tiny-chat"))
        return self.model_copy(update={"gateway": self.gateway.model_copy(update={"models": [tiny]})})

    @property
    def keys_path(self) -> Path:
        return self.gateway.auth.keys_path or self.data_dir / "keys.sqlite"



def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the tree from defaults, the YAML file (argument or $SERVOLOOP_CONFIG) and env vars.

    Raises ConfigError naming the file and the offending field; never returns a half-valid tree.
    """
    path = config or os.environ.get(CONFIG_ENV)
    yaml_path = Path(path) if path else None
    token = _pending_yaml_path.set(yaml_path)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        where = f" in {yaml_path}" if yaml_path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid settings{where}: {problems}") from e
    finally:
        _pending_yaml_path.reset(token)


_SECRET_WORDS = ("password", "api_key", "secret", "token", "authorization")
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^@/\s]*@")


def redacted(settings: Settings) -> dict[str, Any]:
    """The tree as plain data with every secret-looking value replaced by '***'."""

    def secret(key: str, value: Any) -> bool:  # numbers (max_tokens, ...) are never secrets; x-api-key is api_key
        return bool(value) and not isinstance(value, int | float) and any(
            w in key.lower().replace("-", "_") for w in _SECRET_WORDS)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if secret(k, v) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):  # credentials inside a URL: scheme://user:PASSWORD@host
            return _URL_PASSWORD.sub(r"\1***@", node)
        return node

    return walk(settings.model_dump(mode="json"))
