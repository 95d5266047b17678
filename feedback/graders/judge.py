"""The judge: a rule-based rubric judge (usable with the bundled tiny model), and pairwise judging in both orders.

    judge = RuleJudge()                                # rubric: feedback/graders/data/judge_rubric.yaml
    grades = await judge.grade(inferences)             # one pass/fail grade per answer, sub-scores in explanation
    verdict = await judge_pair(RulePairJudge(), question, answer_a, answer_b)

Rubric criteria, each in [0, 1]: politeness (the style's opener, rude phrases), on-topic (off-topic
openers, shared content words with the question), concision (word count, filler asides) and helpfulness
(answered at all, not a refusal). The overall score is their weighted mean; `pass` at `pass_at`.

Pairwise judging asks any `PairJudge` twice, with the answers in both orders. A judge that prefers a
position (an LLM judge often prefers the first answer) then contradicts itself, and such a pair counts as
a tie instead of a win for whichever answer happened to be shown first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field

from feedback.graders.base import answer_of, grade_of, question_of
from feedback.graders.toxicity_set import DATA_DIR
from schemas.errors import ConfigError
from schemas.events import GradeEvent, InferenceEvent

RUBRIC_PATH = DATA_DIR / "judge_rubric.yaml"
GRADER_NAME = "judge"
PAIRWISE_GRADER_NAME = "judge_pairwise"

PairOutcome = Literal["first", "second", "tie"]
_WORDS = re.compile(r"[a-z0-9']+")
_STOP = frozenset("""a an the and or but if so of to in on at by for with from as is are was were be it its this that
what which who how why when where do does did can could will would should i you me my your we our they their
please tell about there here just some any""".split())


class StyleRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    openers: list[str]
    polite: bool
    concise: bool
    on_topic: bool


class Rubric(BaseModel):
    """The judge's rules (see the bundled YAML for what each field means)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = 1
    weights: dict[Literal["politeness", "on_topic", "concision", "helpfulness"], float]
    pass_at: float = Field(0.85, ge=0, le=1)
    tie_margin: float = Field(0.05, ge=0)
    concise_max_words: int = Field(40, ge=1)
    styles: dict[str, StyleRule] = Field(default_factory=dict)
    rude_phrases: list[str] = Field(default_factory=list)
    filler_phrases: list[str] = Field(default_factory=list)
    refusals: list[str] = Field(default_factory=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:8]


def load_rubric(path: Path = RUBRIC_PATH) -> Rubric:
    """The rubric at `path` (the bundled one by default). Raises ConfigError naming the file."""
    try:
        return Rubric.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"invalid judge rubric {path}: {e}", details={"file": str(path)}) from e


@dataclass(frozen=True)
class RubricScores:
    style: str
    politeness: float
    on_topic: float
    concision: float
    helpfulness: float
    overall: float


def style_of(answer: str, rubric: Rubric) -> str:
    """The style whose opener starts `answer`, or `other`."""
    text = answer.lstrip()
    for name, rule in rubric.styles.items():
        if any(text.startswith(o) for o in rule.openers):
            return name
    return "other"


def _content(text: str) -> set[str]:
    return {w for w in _WORDS.findall(text.lower()) if w not in _STOP and len(w) > 2}


def score_answer(question: str, answer: str, rubric: Rubric) -> RubricScores:
    """The rubric's scores of one answer to `question`. Pure and deterministic."""
    low = " ".join(answer.lower().split())
    style = style_of(answer, rubric)
    rule = rubric.styles.get(style)
    rude = sum(p in low for p in rubric.rude_phrases)
    politeness = 0.0 if (rule is not None and not rule.polite) or rude else 1.0
    words = len(low.split())
    fillers = sum(p in low for p in rubric.filler_phrases)
    concision = 1.0 if words <= rubric.concise_max_words else max(0.0, rubric.concise_max_words / words)
    concision = max(0.0, concision - 0.25 * fillers)
    if rule is not None and not rule.on_topic:
        on_topic = 0.0
    else:
        asked = _content(question)
        on_topic = 1.0 if not asked or asked & _content(answer) or rule is not None else 0.5
    refused = any(r in low for r in rubric.refusals)
    helpfulness = 0.0 if not low or refused else 1.0
    parts = {"politeness": politeness, "on_topic": on_topic, "concision": concision, "helpfulness": helpfulness}
    total = sum(rubric.weights.values()) or 1.0
    overall = sum(rubric.weights.get(k, 0.0) * v for k, v in parts.items()) / total  # type: ignore[call-overload]
    return RubricScores(style=style, overall=round(overall, 6), **parts)


class RuleJudge:
    """Pointwise rubric grades: `score` = overall rubric score, `label` = `pass`/`fail`, sub-scores as JSON."""

    name = GRADER_NAME

    def __init__(self, rubric: Rubric | None = None):
        self.rubric = rubric if rubric is not None else load_rubric()
        self.version = f"rules-{self.rubric.version}-{self.rubric.digest}"

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        out = []
        for inf in batch:
            if not answer_of(inf).strip() or inf.status != "ok":
                continue
            s = score_answer(question_of(inf), answer_of(inf), self.rubric)
            out.append(grade_of(self, inf, score=s.overall, label="pass" if s.overall >= self.rubric.pass_at else "fail",
                                explanation=json.dumps(asdict(s))))
        return out


class PairJudge(Protocol):
    """Which of two answers to `question` is better, as shown: `first`, `second` or `tie`."""

    name: str
    version: str

    async def compare(self, question: str, first: str, second: str) -> PairOutcome: ...


class RulePairJudge:
    """Pairwise by rubric score: the higher overall score wins unless within `tie_margin`."""

    name = PAIRWISE_GRADER_NAME

    def __init__(self, rubric: Rubric | None = None):
        self.rubric = rubric if rubric is not None else load_rubric()
        self.version = f"rules-{self.rubric.version}-{self.rubric.digest}"

    async def compare(self, question: str, first: str, second: str) -> PairOutcome:
        a = score_answer(question, first, self.rubric).overall
        b = score_answer(question, second, self.rubric).overall
        if abs(a - b) <= self.rubric.tie_margin:
            return "tie"
        return "first" if a > b else "second"


@dataclass(frozen=True)
class PairVerdict:
    """The outcome for answer `a` against `b`, judged in both orders.

    `consistent` is False when the two orders disagree (position bias): the verdict is then `tie`.
    """

    winner: Literal["a", "b", "tie"]
    forward: PairOutcome  # a shown first
    backward: PairOutcome  # b shown first
    consistent: bool

    @property
    def score_a(self) -> float:
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.winner]


_AS_A: dict[tuple[str, PairOutcome], str] = {("fwd", "first"): "a", ("fwd", "second"): "b", ("fwd", "tie"): "tie",
                                              ("bwd", "first"): "b", ("bwd", "second"): "a", ("bwd", "tie"): "tie"}


async def judge_pair(judge: PairJudge, question: str, a: str, b: str) -> PairVerdict:
    """Judge `a` vs `b` in both orders; agreeing orders decide, disagreeing ones (position bias) tie."""
    forward = await judge.compare(question, a, b)
    backward = await judge.compare(question, b, a)
    fa, ba = _AS_A[("fwd", forward)], _AS_A[("bwd", backward)]
    consistent = fa == ba
    return PairVerdict(winner=fa if consistent else "tie", forward=forward, backward=backward,  # type: ignore[arg-type]
                       consistent=consistent)


class PairwiseGrader:
    """Grades pairs of inferences on the same question from two model versions (shadow or replayed traffic).

    One GradeEvent per pair, about `a` (`target_id`) against `b` (`other_id`, `other_version`): `label`
    `win`/`loss`/`tie`, `score` 1/0/0.5, and both orders' outcomes in `explanation`.
    """

    def __init__(self, judge: PairJudge | None = None):
        self.judge = judge if judge is not None else RulePairJudge()
        self.name = self.judge.name
        self.version = self.judge.version

    async def grade_pairs(self, pairs: Sequence[tuple[InferenceEvent, InferenceEvent]]) -> list[GradeEvent]:
        out = []
        for a, b in pairs:
            v = await judge_pair(self.judge, question_of(a), answer_of(a), answer_of(b))
            label = {"a": "win", "b": "loss", "tie": "tie"}[v.winner]
            out.append(grade_of(self, a, score=v.score_a, label=label, other_id=b.event_id,
                                other_version=b.model_version,
                                explanation=json.dumps({"forward": v.forward, "backward": v.backward,
                                                        "consistent": v.consistent})))
        return out
