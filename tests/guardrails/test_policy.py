"""Policy files: resolution per tenant and model, clear load errors, hot reload that keeps the last good."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from guardrails import PolicyReloader, PolicySet, default_policy_set, load_policy_set, parse_policy_set
from schemas.errors import ConfigError

POLICY = """
version: 1
default:
  output:
    blocklist: {action: block, words: [frobnicate]}
models:
  tiny: {input: {pii: {enabled: false}}}
tenants:
  acme:
    allowlist: {values: [support@acme.com]}
    input:
      blocklist: {action: block, phrases: [project falcon], regexes: ['ACME-[0-9]{4}']}
    models:
      tiny: {input: {pii: {enabled: true, action: block}}}
  kids:
    input:
      limits: {allowed_scripts: [LATIN], max_chars: 50}
"""


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return parse_policy_set(POLICY, "test.yaml")


def test_the_bundled_default_policy_loads_and_guards_both_sides() -> None:
    p = default_policy_set().resolve("nobody", "nothing")
    assert {s.detector.name for s in p.input.steps} == {"limits", "invisible", "injection", "secrets", "pii"}
    assert {s.detector.name for s in p.output.steps} == {"secrets", "pii", "invisible"}
    assert p.check_output("code ZX-99", system_prompt_canary="zx-99").action == "block"


def test_unknown_tenants_and_models_fall_back_to_defaults(policies: PolicySet) -> None:
    assert policies.resolve("stranger", "other").check_input("mail a@b.co").text == "mail [EMAIL]"
    assert policies.resolve("stranger", "other").check_output("frobnicate it").action == "block"


def test_model_then_tenant_then_tenant_model_override_in_that_order(policies: PolicySet) -> None:
    assert policies.resolve("stranger", "tiny").check_input("mail a@b.co").action == "allow"
    acme_tiny = policies.resolve("acme", "tiny")
    assert acme_tiny.check_input("mail a@b.co").action == "block"
    assert policies.resolve("acme", "other").check_input("mail a@b.co").action == "redact"


def test_tenant_blocklists_and_allowlists_apply_to_that_tenant_only(policies: PolicySet) -> None:
    acme = policies.resolve("acme", "x")
    assert acme.check_input("status of project falcon?").action == "block"
    assert acme.check_input("ticket ACME-1234").action == "block"
    assert acme.check_input("write to support@acme.com").action == "allow"
    assert policies.resolve("other", "x").check_input("status of project falcon?").action == "allow"


def test_limits_and_scripts_per_tenant(policies: PolicySet) -> None:
    kids = policies.resolve("kids", "x")
    assert kids.check_input("x" * 51).action == "block"
    assert kids.check_input("Привет, как дела? Это тест.").action == "block"
    assert kids.check_input("Hello there, how are you?").action == "allow"


@pytest.mark.parametrize(("doc", "path", "problem"), [
    ("version: 2", "version", "Input should be 1"),
    ("default: {input: {pii: {action: shred}}}", "default.input.pii.action", "allow"),
    ("default: {input: {pii: {threshold: 1.5}}}", "default.input.pii.threshold", "less than or equal to 1"),
    ("default: {input: {spellcheck: {}}}", "default.input.spellcheck", "unknown detector"),
    ("default: {output: {injection: {}}}", "default.output.injection", "input side only"),
    ("tenants: {a: {input: {pii: {types: [EMAIL, SHOE_SIZE]}}}}", "tenants.a.input.pii.types", "SHOE_SIZE"),
    ("tenants: {a: {input: {blocklist: {regexes: ['a.*b']}}}}", "tenants.a.input.blocklist", "unbounded"),
    ("tenants: {a: {input: {blocklist: {regexes: ['(unclosed']}}}}", "tenants.a.input.blocklist", "missing"),
    ("tenants: {a: {input: {blocklist: {colour: red}}}}", "tenants.a.input.blocklist.colour", "Extra inputs"),
    ("tenants: {a: {allowlist: {regexes: ['[']}}}", "tenants.a.allowlist.regexes[0]", "regular expression"),
    ("tenants: {a: {models: {m: {output: {limits: {}}}}}}", "tenants.a.models.m.output.limits", "input side only"),
    ("default: [1, 2]", "default", "valid dictionary"),
    ("default: {input: {pii: {action: redact}}\n  bad: [", "(root)", "not valid YAML"),
])
def test_a_bad_policy_is_refused_naming_file_field_and_problem(doc: str, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_policy_set(doc, "tenants.yaml")
    message = e.value.message
    assert "tenants.yaml" in message and problem in message
    if path != "(root)":
        assert path in message
        assert any(err["path"] == path for err in e.value.details["errors"])


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy_set(tmp_path / "nope.yaml")


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()  # make sure the change is visible even within the file system's mtime resolution
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_reloader_picks_up_an_edit_and_keeps_the_last_good_policy_on_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, "default: {output: {blocklist: {words: [alpha]}}}")
    errors = []
    reloader = PolicyReloader(path, on_error=errors.append)
    first = reloader.current
    assert not reloader.poll()  # nothing changed
    _write(path, "default: {output: {blocklist: {words: [beta]}}}")
    assert reloader.poll() and reloader.generation == 1
    assert reloader.current.resolve("t", "m").check_output("beta").action == "block"
    good = reloader.current
    _write(path, "default: {output: {blocklist: {words: [gamma], colour: red}}}")
    assert not reloader.poll()
    assert reloader.current is good and good is not first
    assert reloader.last_error is not None and "colour" in reloader.last_error.message
    assert len(errors) == 1
    path.unlink()
    assert not reloader.poll() and reloader.current is good and "cannot read" in reloader.last_error.message
    _write(path, "default: {output: {blocklist: {words: [delta]}}}")
    assert reloader.poll() and reloader.last_error is None


def test_the_first_load_of_a_bad_file_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, "version: 7")
    with pytest.raises(ConfigError):
        PolicyReloader(path)


async def test_reloader_runs_as_an_asyncio_task(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, "default: {output: {blocklist: {words: [alpha]}}}")
    reloaded = asyncio.Event()
    reloader = PolicyReloader(path, interval_s=0.01, on_reload=lambda _ps: reloaded.set())
    stop = asyncio.Event()
    task = asyncio.create_task(reloader.run(stop))
    _write(path, "default: {output: {blocklist: {words: [omega]}}}")
    await asyncio.wait_for(reloaded.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert reloader.current.resolve("t", "m").check_output("omega!").action == "block"
