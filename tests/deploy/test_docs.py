"""docs/: the generated references are up to date and agree with what they describe; every page is linked from
the README and every relative link in the docs resolves."""

from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType

import pytest

from tests.deploy.conftest import REPO

DOCS = REPO / "docs"
PAGES = ("quickstart.md", "concepts.md", "api.md", "configuration.md", "operations.md", "troubleshooting.md")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_api() -> ModuleType:
    return _load("gen_api")


def test_configuration_reference_is_generated_from_the_current_settings_tree() -> None:
    committed = (DOCS / "configuration.md").read_text()
    assert committed == _load("gen_config").render(), \
        "docs/configuration.md is stale: .venv/bin/python docs/gen_config.py > docs/configuration.md"


def test_configuration_reference_lists_every_leaf_setting() -> None:
    text = (DOCS / "configuration.md").read_text()
    for path in ("events.broker.bootstrap_servers", "gateway.models[].kv_cache_gib", "retrain.min_pairs",
                 "gateway.tracing.langfuse.secret_key", "grading.graders.<key>.sample_rate", "monitors.interval_s"):
        assert f"| `{path}` |" in text, path
    assert "`SERVOLOOP_EVENTS__STORE__PASSWORD`" in text


def test_api_reference_is_generated_from_the_protos_and_routes(gen_api: ModuleType) -> None:
    assert (DOCS / "api.md").read_text() == gen_api.render(), \
        "docs/api.md is stale: .venv/bin/python docs/gen_api.py > docs/api.md"


def test_every_http_route_has_a_summary_and_no_summary_is_stale(gen_api: ModuleType) -> None:
    routes = {(r.method, r.path) for r in gen_api.http_routes()}
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/chat/completions"), ("POST", "/v1/feedback")} <= routes
    assert routes - set(gen_api.ROUTE_SUMMARIES) == set(), "add these routes to ROUTE_SUMMARIES in docs/gen_api.py"
    assert set(gen_api.ROUTE_SUMMARIES) - routes == set(), "these summaries name routes that no longer exist"


def test_proto_reader_agrees_with_the_compiled_descriptors(gen_api: ModuleType) -> None:
    from schemas.pb import feedback_pb2, inference_pb2

    for module in (feedback_pb2, inference_pb2):
        desc = module.DESCRIPTOR
        parsed = gen_api.parse_proto(REPO / "schemas" / "pb" / desc.name.split("/")[-1])
        assert parsed.package == desc.package
        assert {s[0]: [r[0] for r in s[2]] for s in parsed.services} == \
            {name: [m.name for m in s.methods] for name, s in desc.services_by_name.items()}
        assert {m[0]: sorted(f[0] for f in m[2]) for m in parsed.messages} == \
            {name: sorted(f.name for f in m.fields) for name, m in desc.message_types_by_name.items()}
        streaming = {r[0] for s in parsed.services for r in s[2] if r[2].startswith("stream ")}
        assert streaming == {m.name for s in desc.services_by_name.values() for m in s.methods
                             if m.server_streaming}


def test_readme_links_every_docs_page_and_every_relative_link_resolves() -> None:
    readme = (REPO / "README.md").read_text()
    for page in PAGES:
        assert (DOCS / page).is_file(), page
        assert f"(docs/{page})" in readme, f"README.md does not link docs/{page}"
    for source in [REPO / "README.md", *(DOCS / p for p in PAGES)]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", source.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (source.parent / target).exists(), f"{source.name}: broken link {target}"


def _shell_lines(text: str) -> list[str]:
    """Lines inside ```bash / ```sh fences (fences are read line by line, so other languages never pair up)."""
    out, lang = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:].strip() or "text")
        elif lang in ("bash", "sh"):
            out.append(line.strip())
    return out


def test_docs_name_only_real_cli_commands(cli_root) -> None:
    seen = 0
    for page in PAGES:
        for line in _shell_lines((DOCS / page).read_text()):
            m = re.search(r"(?:^|\s|/)servoloop ((?:[a-z][\w-]*\s?)+)", line)
            if not m or line.startswith("#"):
                continue
            cmd = cli_root
            walked: list[str] = []
            for word in m.group(1).split():  # command words only: the rest are arguments
                if getattr(cmd, "commands", None) is None or word not in cmd.commands:
                    break
                cmd = cmd.commands[word]
                walked.append(word)
            assert walked and getattr(cmd, "commands", None) is None, f"{page}: `{line}` names no servoloop command"
            seen += 1
    assert seen >= 8


def test_docs_pages_exist_and_are_not_stubs() -> None:
    for page in PAGES:
        text = (DOCS / page).read_text()
        assert text.startswith("# ") and len(text) > 1500, page


