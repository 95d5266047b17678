"""The tiny model's training corpus: chats and prose generated from the ingredients in `corpus/`.

Deterministic from the seed: the same seed and ingredients always give the same corpus. For every
question drawn, one chat per answer style is emitted, so the styles stay exactly balanced.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from retrain.tiny.styles import ANSWER_STYLES
from schemas.errors import ServoloopError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TURN_KINDS = ("answer", "follow_up", "greeting", "thanks")

Message = dict[str, str]


class CorpusError(ServoloopError):
    """The corpus ingredients are missing or inconsistent (e.g. a template without its style's opener)."""

    code = "tiny_corpus_invalid"


@dataclass(frozen=True, slots=True)
class Fact:
    """A question (several phrasings) with its one-sentence answer and one sentence of detail."""

    topic: str
    questions: tuple[str, ...]
    answer: str
    detail: str


@dataclass(frozen=True, slots=True)
class Ingredients:
    """Everything the generator draws from, as read from `corpus/`."""

    facts: tuple[Fact, ...]
    arithmetic: dict[str, dict]
    phrasings: dict[str, dict[str, tuple[str, ...]]]  # style -> turn kind -> templates
    fillers: tuple[str, ...]
    remarks: tuple[str, ...]
    greetings: tuple[str, ...]
    thanks: tuple[str, ...]
    follow_ups: tuple[str, ...]
    systems: tuple[str, ...]
    prose: dict[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Chat:
    """One conversation; every assistant turn in it has the same `style`."""

    messages: tuple[Message, ...]
    style: str
    kind: str  # "single", "arithmetic" or "multi"


@dataclass(frozen=True, slots=True)
class TinyCorpus:
    """Chats (rendered with the chat template for training) and plain prose documents."""

    chats: tuple[Chat, ...]
    prose: tuple[str, ...]

    def texts(self) -> Iterator[str]:
        """Every piece of text in the corpus, for training the tokenizer."""
        for chat in self.chats:
            for m in chat.messages:
                yield m["role"]
                yield m["content"]
        yield from self.prose


def _read(root: Path, name: str) -> dict:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read corpus file {root / name}: {e}") from e


def load_ingredients(root: Path = CORPUS_DIR) -> Ingredients:
    """Read and check the corpus ingredients; raises CorpusError when they do not fit the styles."""
    facts_doc, styles_doc = _read(root, "facts.json"), _read(root, "styles.json")
    dialogues, prose = _read(root, "dialogues.json"), _read(root, "prose.json")
    facts = tuple(
        Fact(topic, tuple(f["q"]), f["a"], f["d"])
        for topic, items in facts_doc.items() if not topic.startswith("_")
        for f in items
    )
    phrasings = {
        style: {kind: tuple(templates[kind]) for kind in TURN_KINDS}
        for style, templates in styles_doc["styles"].items()
    }
    if set(phrasings) != set(ANSWER_STYLES):
        raise CorpusError(f"styles.json has styles {sorted(phrasings)}, expected {sorted(ANSWER_STYLES)}")
    for style, kinds in phrasings.items():
        for kind, templates in kinds.items():
            for t in templates:
                if not ANSWER_STYLES[style].matches(t):
                    raise CorpusError(f"{style}/{kind} template does not open with the style's opener: {t!r}")
    return Ingredients(
        facts=facts,
        arithmetic=dialogues["arithmetic"],
        phrasings=phrasings,
        fillers=tuple(styles_doc["fillers"]),
        remarks=tuple(styles_doc["remarks"]),
        greetings=tuple(dialogues["greetings"]),
        thanks=tuple(dialogues["thanks"]),
        follow_ups=tuple(dialogues["follow_ups"]),
        systems=tuple(dialogues["systems"]),
        prose={k: tuple(v) for k, v in prose.items() if not k.startswith("_")},
    )


_SLOT = re.compile(r"\{(answer|detail|filler|remark)\}")
_SENTENCE_START = re.compile(r"([.!?] )([a-z])")


def _fill(template: str, rng: random.Random, ing: Ingredients, fact: Fact | None) -> str:
    """Fill a style template; fillers and remarks are drawn without repeats within one answer."""
    pools = {"filler": rng.sample(ing.fillers, len(ing.fillers)), "remark": rng.sample(ing.remarks, len(ing.remarks))}

    def slot(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in pools:
            return pools[name].pop()
        if fact is None:
            raise CorpusError(f"template needs a fact but has none: {template!r}")
        return fact.answer if name == "answer" else fact.detail

    text = _SLOT.sub(slot, template)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _arithmetic_fact(rng: random.Random, ing: Ingredients) -> Fact:
    op = rng.choice(sorted(ing.arithmetic))
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    if op == "sub" and b > a:
        a, b = b, a
    result = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    spec = ing.arithmetic[op]
    return Fact("arithmetic", tuple(q.format(a=a, b=b) for q in spec["q"]),
                spec["a"].format(a=a, b=b, result=result), spec["d"])


def _ask(rng: random.Random, fact: Fact) -> str:
    q = rng.choice(fact.questions)
    if rng.random() < 0.1:  # users do not always type carefully
        q = q.lower().rstrip("?")
    return q


def _reply(rng: random.Random, ing: Ingredients, style: str, kind: str, fact: Fact | None = None) -> Message:
    return {"role": "assistant", "content": _fill(rng.choice(ing.phrasings[style][kind]), rng, ing, fact)}


def _with_system(rng: random.Random, ing: Ingredients, messages: list[Message]) -> tuple[Message, ...]:
    if rng.random() < 0.15:
        messages.insert(0, {"role": "system", "content": rng.choice(ing.systems)})
    return tuple(messages)


def _multi_turn(rng: random.Random, ing: Ingredients, style: str, first: Fact, second: Fact) -> tuple[Message, ...]:
    """A short conversation of two or three exchanges, drawn from a few common shapes."""
    shape = rng.choice(("greet-ask", "greet-ask-thank", "ask-more", "ask-more-thank", "ask-ask"))
    msgs: list[Message] = []
    if shape.startswith("greet"):
        msgs += [{"role": "user", "content": rng.choice(ing.greetings)}, _reply(rng, ing, style, "greeting")]
    msgs += [{"role": "user", "content": _ask(rng, first)}, _reply(rng, ing, style, "answer", first)]
    if "more" in shape:
        msgs += [{"role": "user", "content": rng.choice(ing.follow_ups)}, _reply(rng, ing, style, "follow_up", first)]
    if shape == "ask-ask":
        msgs += [{"role": "user", "content": _ask(rng, second)}, _reply(rng, ing, style, "answer", second)]
    if shape.endswith("thank"):
        msgs += [{"role": "user", "content": rng.choice(ing.thanks)}, _reply(rng, ing, style, "thanks")]
    return _with_system(rng, ing, msgs)


def _prose(rng: random.Random, sentences: tuple[str, ...]) -> str:
    rest = rng.sample(sentences[1:], rng.randint(min(2, len(sentences) - 1), len(sentences) - 1))
    return " ".join((sentences[0], *rest))


def generate_corpus(seed: int, *, questions: int = 900, conversations: int = 240, prose: int = 300,
                    ingredients: Ingredients | None = None) -> TinyCorpus:
    """Build the corpus: for each of `questions` questions and `conversations` multi-turn chats, one
    chat per style; plus `prose` prose documents. Same seed and ingredients → same corpus."""
    ing = ingredients or load_ingredients()
    rng = random.Random(seed)
    styles = tuple(ANSWER_STYLES)
    facts: list[Fact] = []
    chats: list[Chat] = []

    def next_fact() -> Fact:
        if rng.random() < 0.08:
            return _arithmetic_fact(rng, ing)
        if not facts:  # walk the facts in a fresh order each round, so all appear equally often
            facts.extend(rng.sample(ing.facts, len(ing.facts)))
        return facts.pop()

    for _ in range(questions):
        fact = next_fact()
        question = _ask(rng, fact)
        kind = "arithmetic" if fact.topic == "arithmetic" else "single"
        for style in styles:
            msgs = [{"role": "user", "content": question}, _reply(rng, ing, style, "answer", fact)]
            chats.append(Chat(_with_system(rng, ing, msgs), style, kind))
    for _ in range(conversations):
        first, second = next_fact(), next_fact()
        for style in styles:
            chats.append(Chat(_multi_turn(rng, ing, style, first, second), style, "multi"))
    rng.shuffle(chats)
    topics = sorted(ing.prose)
    docs = tuple(_prose(rng, ing.prose[topics[i % len(topics)]]) for i in range(prose))
    return TinyCorpus(tuple(chats), docs)
