"""Guardrails: detectors, redaction, streaming output filtering, per-tenant policy and verdicts.

The gateway's whole interface::

    policies = load_policy_set(path)            # or default_policy_set(), or PolicyReloader(path).current
    policy = policies.resolve(tenant, model)
    verdict = policy.check_input(messages)      # Verdict(action, findings, texts)
    if verdict.blocked: raise GuardrailBlocked(verdict)
    guard = policy.stream_guard(system_prompt_canary=canary)
    for chunk in engine: yield guard.feed(chunk) ...; yield guard.finish(); guard.blocked, guard.verdict
"""

from guardrails.chain import Chain, Step, redact
from guardrails.detectors.base import Detector
from guardrails.policy import (
    Guardrail,
    Policy,
    PolicySet,
    default_policy_set,
    load_policy_set,
    parse_policy_set,
)
from guardrails.reload import PolicyReloader
from guardrails.stream import StreamGuard
from guardrails.verdict import (
    Action,
    Finding,
    GuardrailBlocked,
    GuardrailVerdict,
    Side,
    Verdict,
    summarise,
)

__all__ = [
    "Action",
    "Chain",
    "Detector",
    "Finding",
    "Guardrail",
    "GuardrailBlocked",
    "GuardrailVerdict",
    "Policy",
    "PolicyReloader",
    "PolicySet",
    "Side",
    "Step",
    "StreamGuard",
    "Verdict",
    "default_policy_set",
    "load_policy_set",
    "parse_policy_set",
    "redact",
    "summarise",
]
