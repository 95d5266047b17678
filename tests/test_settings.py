"""The one settings tree: defaults, a YAML file, env vars over both, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ConfigError
from servoloop.settings import load_settings, redacted


def test_defaults_serve_the_bundled_tiny_model_on_the_standard_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVOLOOP_CONFIG", raising=False)
    s = load_settings().with_default_model()
    assert (s.gateway.http_port, s.gateway.grpc_port) == (8000, 50051)
    assert [m.name for m in s.gateway.models] == ["tiny-chat"]
    assert s.gateway.models[0].path.endswith("models/tiny-chat")


def test_yaml_file_then_env_vars_override_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "servoloop.yaml"
    cfg.write_text("gateway:\n  http_port: 9100\n  limits:\n    max_prompt_tokens: 99\n"
                   "  models:\n    - {name: fleet, engine: remote, url: 'http://vllm:8000/v1', api_key: s3cret}\n")
    monkeypatch.setenv("SERVOLOOP_GATEWAY__HTTP_PORT", "9200")

    s = load_settings(cfg)

    assert s.gateway.http_port == 9200  # env wins over the file
    assert s.gateway.limits.max_prompt_tokens == 99
    assert s.gateway.models[0].url == "http://vllm:8000/v1"
    assert s.with_default_model().gateway.models[0].name == "fleet"  # a configured model replaces the default


def test_settings_file_is_found_through_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("log_level: DEBUG\n")
    monkeypatch.setenv("SERVOLOOP_CONFIG", str(cfg))
    assert load_settings().log_level == "DEBUG"


@pytest.mark.parametrize(("text", "needle"), [
    ("gateway:\n  http_port: lots\n", "gateway.http_port"),
    ("gateway:\n  models:\n    - {name: x, engine: remote}\n", "needs 'url'"),
    ("gateway:\n  models:\n    - {name: x, path: /m, fallbacks: [y]}\n", "fallbacks name unknown"),
    ("gatewya: {}\n", "gatewya"),
    ("- just\n- a list\n", "mapping at the top level"),
    ("gateway: [unclosed\n", "not valid YAML"),
])
def test_broken_config_names_the_file_and_the_field(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert needle in e.value.message
    assert "bad.yaml" in e.value.message


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_config_show_redacts_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  models:\n    - {name: fleet, engine: remote, url: 'http://u/v1', api_key: s3cret}\n"
                   "events:\n  store: {password: hunter2}\n")
    shown = str(redacted(load_settings(cfg)))
    assert "s3cret" not in shown and "hunter2" not in shown and "***" in shown
