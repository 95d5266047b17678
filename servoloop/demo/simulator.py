"""The demo's traffic: simulated users with a hidden preference, and the driver that plays them against a gateway.

Pure part (`population`, `question_pool`, `satisfied`, `feedback_for`): who the users are, what they ask, how
they judge an answer and what feedback they leave, all from a seed. Every user prefers one answer style of
the tiny model (`retrain.tiny.styles`: by default concise and polite); a poisoner rates in reverse. Users leave
thumbs, 1-5 ratings, corrections (the concise polite answer) and, when they asked twice, a pairwise preference.

Imperative part (`TrafficDriver`): one "turn" is a user asking a question over HTTP (OpenAI chat completions)
and, for users who compare, the same question again over gRPC, then posting their feedback through the
gateway's feedback API (HTTP for HTTP answers, gRPC for gRPC ones). Counters feed the live summary.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import httpx

from retrain.tiny.conversations import load_ingredients
from retrain.tiny.styles import classify_style

Group = Literal["trainer", "holdout", "poisoner"]

TOPICS_BEFORE = ("everyday", "cooking")
TOPICS_AFTER = ("travel", "tech")  # the prompt mix after the drift


@dataclass(frozen=True, slots=True)
class SimUser:
    """One simulated user: its tenant, group, hidden preferred style and feedback habits (probabilities)."""

    user_id: str
    tenant: str
    group: Group
    preferred: str = "concise_polite"
    thumbs: float = 1.0
    rating: float = 0.0
    compare: float = 0.0  # asks twice and states a preference between the answers
    correct: float = 0.0  # rewrites a disliked answer

    @property
    def reverse(self) -> bool:
        return self.group == "poisoner"


@dataclass(frozen=True, slots=True)
class Question:
    """A prompt and the one-sentence answer a user would write as a correction."""

    text: str
    answer: str
    topic: str


@dataclass(frozen=True, slots=True)
class Answer:
    """One served answer: its inference id, text, served version and transport."""

    inference_id: str
    text: str
    version: str
    transport: Literal["http", "grpc"]


@dataclass(frozen=True, slots=True)
class Feedback:
    """One feedback submission, as the feedback API takes it (`body` is the HTTP JSON body)."""

    transport: Literal["http", "grpc"]
    body: dict[str, Any]


def population(trainers: int, holdout: int, poisoners: int, *, seed: int, train_tenant: str = "demo",
               holdout_tenant: str = "demo") -> list[SimUser]:
    """Users of the three groups with seeded habits. Held-out users only leave thumbs (the demo plays them
    after the first trigger, outside its dataset's window, so none of their feedback trains the version they
    measure); poisoners share the trainers' tenant and rate in reverse."""
    rng = random.Random(seed)
    users = [SimUser(f"t{i}", train_tenant, "trainer", thumbs=rng.uniform(0.6, 1.0), rating=rng.uniform(0.1, 0.5),
                     compare=rng.uniform(0.7, 1.0), correct=rng.uniform(0.2, 0.5)) for i in range(trainers)]
    users += [SimUser(f"h{i}", holdout_tenant, "holdout") for i in range(holdout)]
    users += [SimUser(f"p{i}", train_tenant, "poisoner", thumbs=1.0, rating=rng.uniform(0.1, 0.5),
                      compare=1.0) for i in range(poisoners)]
    return users


def question_pool(topics: Sequence[str]) -> list[Question]:
    """Every phrasing of every fact of `topics` in the tiny model's corpus, with the fact's answer."""
    facts = load_ingredients().facts
    return [Question(q, f.answer, f.topic) for f in facts if f.topic in topics for q in f.questions]


def satisfied(user: SimUser, answer: str) -> bool:
    """Does `user` like `answer`? Its style is the user's preferred one (the reverse for a poisoner)."""
    liked = classify_style(answer) == user.preferred
    return liked != user.reverse


def feedback_for(user: SimUser, question: Question, answers: Sequence[Answer], rng: random.Random) -> list[Feedback]:
    """What `user` says about the answers of one turn (pure given `rng`)."""
    out: list[Feedback] = []
    likes = [satisfied(user, a.text) for a in answers]
    for a, like in zip(answers, likes, strict=True):
        if rng.random() < user.thumbs:
            out.append(Feedback(a.transport, {"target_id": a.inference_id, "thumbs": "up" if like else "down",
                                              "user": user.user_id}))
        if rng.random() < user.rating:
            out.append(Feedback(a.transport, {"target_id": a.inference_id, "rating": 5.0 if like else 1.0,
                                              "user": user.user_id}))
        if not like and not user.reverse and rng.random() < user.correct:
            out.append(Feedback(a.transport, {"target_id": a.inference_id, "correction": f"Sure! {question.answer}",
                                              "user": user.user_id}))
    if len(answers) == 2 and likes[0] != likes[1]:
        good, bad = (answers[0], answers[1]) if likes[0] else (answers[1], answers[0])
        out.append(Feedback(good.transport, {"target_id": good.inference_id, "user": user.user_id,
                                             "preference": {"preferred_id": good.inference_id,
                                                            "other_id": bad.inference_id}}))
    return out


# --- the driver --------------------------------------------------------------------------------------------


@dataclass
class TrafficStats:
    """Running counts for the live summary."""

    requests: Counter[str] = field(default_factory=Counter)  # by transport
    versions: Counter[str] = field(default_factory=Counter)  # served model versions
    feedback: Counter[str] = field(default_factory=Counter)  # by kind
    errors: int = 0
    last_error: str = ""

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


def _kind(body: dict[str, Any]) -> str:
    return next(k for k in ("thumbs", "rating", "correction", "preference") if k in body)


class TrafficDriver:
    """Plays simulated users against one gateway over HTTP and gRPC (see the module docstring).

    `keys`: an API key (scopes infer + feedback) per tenant. `concurrency`: turns in flight at once.
    """

    def __init__(self, http_url: str, grpc_target: str, keys: dict[str, str], *, model: str, seed: int,
                 max_tokens: int = 16, concurrency: int = 4) -> None:
        self.http_url = http_url.rstrip("/")
        self.grpc_target = grpc_target
        self.keys = keys
        self.model = model
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.stats = TrafficStats()
        self._http: httpx.AsyncClient | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> TrafficDriver:
        self._http = httpx.AsyncClient(timeout=120)
        self._channel = grpc.aio.insecure_channel(self.grpc_target)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._channel is not None:
            await self._channel.close()

    def _auth(self, user: SimUser) -> str:
        return f"Bearer {self.keys[user.tenant]}"

    async def ask_http(self, user: SimUser, q: Question) -> Answer:
        assert self._http is not None
        r = await self._http.post(f"{self.http_url}/v1/chat/completions", headers={"Authorization": self._auth(user)},
                                  json={"model": self.model, "max_tokens": self.max_tokens, "temperature": 1.0,
                                        "user": user.user_id, "messages": [{"role": "user", "content": q.text}]})
        r.raise_for_status()
        body = r.json()
        self.stats.requests["http"] += 1
        version = r.headers.get("x-servoloop-model-version", "")
        self.stats.versions[version] += 1
        return Answer(r.headers.get("x-servoloop-inference-id") or body["id"], body["choices"][0]["message"]["content"],
                      version, "http")

    async def ask_grpc(self, user: SimUser, q: Question) -> Answer:
        from schemas.pb import inference_pb2 as pb
        from schemas.pb import inference_pb2_grpc as pb_grpc

        assert self._channel is not None
        req = pb.GenerateRequest(model=self.model, messages=[pb.ChatMessage(role="user", content=q.text)],
                                 params=pb.SamplingParams(max_tokens=self.max_tokens, temperature=1.0))
        r = await pb_grpc.InferenceStub(self._channel).Generate(req, metadata=(("authorization", self._auth(user)),),
                                                                timeout=120)
        self.stats.requests["grpc"] += 1
        version = r.model_version
        self.stats.versions[version] += 1
        return Answer(r.id, r.text, version, "grpc")

    async def send(self, user: SimUser, fb: Feedback) -> None:
        if fb.transport == "http":
            assert self._http is not None
            r = await self._http.post(f"{self.http_url}/v1/feedback", headers={"Authorization": self._auth(user)},
                                      json=fb.body)
            r.raise_for_status()
        else:
            from schemas.pb import feedback_pb2 as fpb
            from schemas.pb import feedback_pb2_grpc as fpb_grpc

            assert self._channel is not None
            b = fb.body
            req = fpb.SubmitFeedbackRequest(target_id=b["target_id"], user=b.get("user", ""))
            if "thumbs" in b:
                req.thumbs = fpb.THUMBS_UP if b["thumbs"] == "up" else fpb.THUMBS_DOWN
            elif "rating" in b:
                req.rating = b["rating"]
            elif "correction" in b:
                req.correction = b["correction"]
            else:
                req.preference.CopyFrom(fpb.Preference(**b["preference"]))
            await fpb_grpc.FeedbackStub(self._channel).Submit(req, metadata=(("authorization", self._auth(user)),),
                                                              timeout=30)
        self.stats.feedback[_kind(fb.body)] += 1

    async def turn(self, user: SimUser, questions: Sequence[Question]) -> list[Answer]:
        """One user turn: ask (twice when the user compares: HTTP then gRPC), then leave feedback."""
        rng = random.Random(self.rng.random())
        q = rng.choice(questions)
        try:
            if user.group == "holdout":  # one answer, alternating transports
                answers = [await (self.ask_http if rng.random() < 0.5 else self.ask_grpc)(user, q)]
            elif rng.random() < user.compare:
                answers = list(await asyncio.gather(self.ask_http(user, q), self.ask_grpc(user, q)))
            else:
                answers = [await self.ask_http(user, q)]
            for fb in feedback_for(user, q, answers, rng):
                await self.send(user, fb)
            return answers
        except (httpx.HTTPError, grpc.aio.AioRpcError) as e:  # counted and shown; the demo carries on
            self.stats.errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"[:200]
            return []

    async def play(self, users: Sequence[SimUser], questions: Sequence[Question], *, turns: int | None = None,
                   until: asyncio.Event | None = None) -> int:
        """Play turns of randomly drawn `users` until `turns` are done or `until` is set; returns turns played."""
        played = 0
        sem = asyncio.Semaphore(self.concurrency)
        pending: set[asyncio.Task[list[Answer]]] = set()

        async def one(user: SimUser) -> list[Answer]:
            async with sem:
                return await self.turn(user, questions)

        while (turns is None or played < turns) and not (until is not None and until.is_set()):
            while len(pending) >= self.concurrency:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.create_task(one(self.rng.choice(list(users)))))
            played += 1
        if pending:
            await asyncio.wait(pending)
        return played
