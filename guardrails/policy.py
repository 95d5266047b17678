"""Per-tenant, per-model guardrail policy: YAML in, validated at load, compiled into ready chains.

A file has a `default` node, optional `models.<model>` nodes, and `tenants.<tenant>` nodes that may hold
their own `models.<model>`. Resolution merges bundled default < file default < model < tenant < tenant's
model (mappings merge key by key; lists and scalars replace). Every combination named in the file is
compiled at load, so `PolicySet.resolve` is a dictionary lookup on the request path.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrails.chain import Chain, Step
from guardrails.detectors import REGISTRY, build_detector
from guardrails.detectors.base import Detector
from guardrails.detectors.canary import canary_detector
from guardrails.detectors.lists import Allowlist
from guardrails.rules import UnboundedPattern
from guardrails.stream import BATCH_CHARS, StreamGuard
from guardrails.verdict import Action, GuardrailVerdict, Side, Verdict, summarise
from schemas.errors import ConfigError

BUNDLED = "<bundled default policy>"
DEFAULT_ACTIONS: dict[str, Action] = {"injection": "block", "canary": "block", "limits": "block",
                                      "blocklist": "block"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectorNode(BaseModel):
    """One detector's settings at one level; extra keys are the detector's own parameters."""

    model_config = ConfigDict(extra="allow")
    enabled: bool | None = None
    action: Action | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    types: list[str] | None = None
    type_actions: dict[str, Action] | None = None


class AllowlistNode(_Strict):
    values: list[str] = Field(default_factory=list)
    regexes: list[str] = Field(default_factory=list)


class PolicyNode(_Strict):
    allowlist: AllowlistNode | None = None
    input: dict[str, DetectorNode] | None = None
    output: dict[str, DetectorNode] | None = None


class TenantNode(PolicyNode):
    models: dict[str, PolicyNode] = Field(default_factory=dict)


class PolicyFile(_Strict):
    version: Literal[1] = 1
    base: Literal["bundled", "none"] = "bundled"
    default: PolicyNode = Field(default_factory=PolicyNode)
    models: dict[str, PolicyNode] = Field(default_factory=dict)
    tenants: dict[str, TenantNode] = Field(default_factory=dict)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw(node: PolicyNode | None) -> dict[str, Any]:
    return {} if node is None else node.model_dump(exclude_none=True, exclude={"models"})


@runtime_checkable
class Guardrail(Protocol):
    """The seam the gateway calls: check a request, check a response, or guard a streamed response."""

    def check_input(self, texts: Sequence[str] | str) -> Verdict: ...

    def check_output(self, text: str, *, system_prompt_canary: str | None = None) -> Verdict: ...

    def stream_guard(self, *, system_prompt_canary: str | None = None) -> StreamGuard: ...


class Policy:
    """The compiled policy for one (tenant, model), a `Guardrail`: checks input and output, guards streams.

    Every method is synchronous, pure and bounded by the size of its input.
    """

    def __init__(self, name: str, input_chain: Chain, output_chain: Chain, canary: DetectorNode | None):
        self.name = name
        self.input = input_chain
        self.output = output_chain
        self._canary = canary  # settings for a per-request canary; None: the canary check is off

    def check_input(self, texts: Sequence[str] | str) -> Verdict:
        """Check a request's texts (one per message); `Verdict.texts` holds them redacted, in order."""
        return self.input.check([texts] if isinstance(texts, str) else list(texts))

    def _canary_steps(self, canary: str | None) -> tuple[Step, ...]:
        if not canary or self._canary is None:
            return ()
        c = self._canary
        return (Step(canary_detector(canary), c.action or "block",
                     c.threshold if c.threshold is not None else 0.5),)

    def check_output(self, text: str, *, system_prompt_canary: str | None = None) -> Verdict:
        """Check a whole response; `system_prompt_canary` is the string planted in this request's system prompt."""
        return self.output.check([text], self._canary_steps(system_prompt_canary))

    def stream_guard(self, *, system_prompt_canary: str | None = None,
                     batch_chars: int = BATCH_CHARS) -> StreamGuard:
        """A guard for one streamed response; its output equals `check_output` on the whole text.

        `batch_chars`: new characters gathered before the rules run again (more: cheaper, a longer hold).
        """
        return StreamGuard(self.output, self._canary_steps(system_prompt_canary), batch_chars=batch_chars)

    @property
    def detector_versions(self) -> dict[str, str]:
        return {**self.input.detector_versions, **self.output.detector_versions}

    def summary(self, verdict: Verdict, *, side: Side, elapsed_us: int,
                streamed: bool = False) -> GuardrailVerdict:
        """The telemetry summary of `verdict` under this policy (counts, action, versions, cost)."""
        chain = self.input if side == "input" else self.output
        return summarise(verdict, side=side, elapsed_us=elapsed_us, detectors=chain.detector_versions,
                         policy=self.name, streamed=streamed)


class PolicySet:
    """Every compiled policy of one policy file; `resolve` picks the one for a tenant and a model."""

    def __init__(self, source: str, policies: dict[tuple[str | None, str | None], Policy],
                 tenant_models: dict[str | None, frozenset[str]]):
        self.source = source
        self._policies = policies
        self._tenant_models = tenant_models

    def resolve(self, tenant: str, model: str) -> Policy:
        """The policy for `tenant` and `model`; unknown tenants and models fall back to the defaults."""
        t: str | None = tenant if tenant in self._tenant_models else None
        m: str | None = model if model in self._tenant_models[t] else None
        return self._policies[(t, m)]

    @property
    def tenants(self) -> tuple[str, ...]:
        return tuple(sorted(t for t in self._tenant_models if t is not None))


class _Errors:
    def __init__(self, source: str):
        self.source, self.items = source, []  # type: ignore[var-annotated]

    def add(self, path: str, what: str) -> None:
        self.items.append({"path": path or "(root)", "error": what})

    def raise_if_any(self) -> None:
        if self.items:
            shown = "; ".join(f"{e['path']}: {e['error']}" for e in self.items[:8])
            more = f" (and {len(self.items) - 8} more)" if len(self.items) > 8 else ""
            raise ConfigError(f"invalid guardrail policy {self.source}: {shown}{more}",
                              details={"file": self.source, "errors": self.items})


def _check_node(node: PolicyNode | None, path: str, errors: _Errors, cache: dict) -> None:  # type: ignore[type-arg]
    if node is None:
        return
    if node.allowlist is not None:
        for i, r in enumerate(node.allowlist.regexes):
            try:
                regex.compile(r)
            except regex.error as e:
                errors.add(f"{path}.allowlist.regexes[{i}]", f"not a valid regular expression: {e}")
    for side in ("input", "output"):
        for name, det in (getattr(node, side) or {}).items():
            where = f"{path}.{side}.{name}"
            spec = REGISTRY.get(name)
            if spec is None:
                errors.add(where, f"unknown detector (known: {', '.join(sorted(REGISTRY))})")
                continue
            if side not in spec.sides:
                errors.add(where, f"detector {name!r} runs on the {'/'.join(sorted(spec.sides))} side only")
            for key, types in (("types", det.types or []), ("type_actions", list(det.type_actions or {}))):
                bad = [t for t in types if spec.types is not None and t not in spec.types]
                if bad:
                    errors.add(f"{where}.{key}", f"unknown finding type(s) {bad} for {name!r} "
                                                 f"(known: {', '.join(sorted(spec.types or ()))})")
            try:
                params = spec.params.model_validate(det.model_extra or {})
            except ValidationError as e:
                for err in e.errors():
                    errors.add(".".join([where, *map(str, err["loc"])]), err["msg"])
                continue
            try:
                build_detector(name, params, cache)
            except (UnboundedPattern, regex.error, ValueError) as e:
                errors.add(where, str(e))


def _compile(name: str, merged: dict[str, Any], cache: dict) -> Policy:  # type: ignore[type-arg]
    node = PolicyNode.model_validate(merged)
    allow = Allowlist(node.allowlist.values, node.allowlist.regexes) if node.allowlist else None
    chains: dict[str, Chain] = {}
    canary: DetectorNode | None = None
    for side in ("input", "output"):
        steps = []
        for det_name, det in (getattr(node, side) or {}).items():
            if det.enabled is False:
                continue
            spec = REGISTRY[det_name]
            if det_name == "canary":
                canary = det
            detector: Detector | None = build_detector(det_name, spec.params.model_validate(det.model_extra or {}),
                                                       cache)
            if detector is None:
                continue
            steps.append(Step(detector=detector, action=det.action or DEFAULT_ACTIONS.get(det_name, "redact"),
                              threshold=det.threshold if det.threshold is not None else 0.5,
                              types=frozenset(det.types) if det.types is not None else None,
                              type_actions=dict(det.type_actions or {})))
        chains[side] = Chain(tuple(steps), allow or None)
    return Policy(name, chains["input"], chains["output"], canary)


def parse_policy_set(text: str, source: str = "<string>") -> PolicySet:
    """Validate and compile a policy document.

    Raises ConfigError naming the file, the path of each offending field and what is wrong with it.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid guardrail policy {source}: not valid YAML: {e}",
                          details={"file": source}) from e
    raw = {} if raw is None else raw
    errors = _Errors(source)
    if not isinstance(raw, dict):
        errors.add("", "the top level must be a mapping")
        errors.raise_if_any()
    try:
        doc = PolicyFile.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            errors.add(".".join(map(str, err["loc"])), err["msg"])
        errors.raise_if_any()
        raise  # unreachable: pydantic reported no error
    cache: dict = {}  # type: ignore[type-arg]
    _check_node(doc.default, "default", errors, cache)
    for m, node in doc.models.items():
        _check_node(node, f"models.{m}", errors, cache)
    for t, tnode in doc.tenants.items():
        _check_node(tnode, f"tenants.{t}", errors, cache)
        for m, node in tnode.models.items():
            _check_node(node, f"tenants.{t}.models.{m}", errors, cache)
    errors.raise_if_any()
    base = _bundled_default() if doc.base == "bundled" and source != BUNDLED else {}
    default = _merge(base, _raw(doc.default))
    policies: dict[tuple[str | None, str | None], Policy] = {}
    tenant_models: dict[str | None, frozenset[str]] = {None: frozenset(doc.models)}
    for m in (None, *doc.models):
        merged = _merge(default, _raw(doc.models[m])) if m else default
        policies[(None, m)] = _compile(f"default/{m or '*'}", merged, cache)
    for t, tnode in doc.tenants.items():
        names = frozenset(doc.models) | frozenset(tnode.models)
        tenant_models[t] = names
        for m in (None, *names):
            merged = _merge(default, _raw(doc.models.get(m)) if m else {})
            merged = _merge(merged, _raw(tnode))
            if m in tnode.models:
                merged = _merge(merged, _raw(tnode.models[m]))
            policies[(t, m)] = _compile(f"{t}/{m or '*'}", merged, cache)
    return PolicySet(source, policies, tenant_models)


def _bundled_text() -> str:
    return resources.files("guardrails").joinpath("data/default_policy.yaml").read_text()


def _bundled_default() -> dict[str, Any]:
    return _raw(PolicyFile.model_validate(yaml.safe_load(_bundled_text())).default)


def load_policy_set(path: Path | str) -> PolicySet:
    """Read, validate and compile the policy file at `path`; raises ConfigError (file, field path, problem)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read guardrail policy {p}: {e.strerror or e}", details={"file": str(p)}) from e
    return parse_policy_set(text, str(p))


def default_policy_set() -> PolicySet:
    """The bundled default policy (guardrails/data/default_policy.yaml), compiled."""
    return parse_policy_set(_bundled_text(), BUNDLED)
