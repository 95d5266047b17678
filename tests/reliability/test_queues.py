"""No unbounded queues: every queue and buffer in the product code is listed here with its bound and the metric
that shows how full it is. A new `Queue(`/`deque(` fails this test until it is listed (with its bound)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "feedback", "retrain", "guardrails", "schemas", "servoloop")
QUEUE = re.compile(r"\b(asyncio\.Queue|queue\.Queue|SimpleQueue|deque)\(")

# (file, the line's text) -> (its bound, and where that bound is enforced; the metric that shows its depth)
QUEUES: dict[tuple[str, str], tuple[str, str | None]] = {
    ("gateway/engines/transformers.py", "queue: asyncio.Queue[Any] = asyncio.Queue()"):
        ("per request: at most max_tokens + 1 items (the limit RequestLimits.max_output_tokens enforces); "
         "at most max_concurrency of them at once", "servoloop_active_streams"),
    ("gateway/engines/batching.py", "self._queue: deque[Row | _Job] = deque()"):
        ("rows admitted by the engine's max_concurrency semaphore, plus one adapter load/evict job per adapter "
         "cache operation awaiting it", None),
    ("gateway/shadow.py", "asyncio.Queue(p.queue_size)"): ("shadow policy queue_size", "servoloop_shadow_queue_depth"),
    ("gateway/langfuse.py", "asyncio.Queue(settings.score_queue_size)"):
        ("tracing.langfuse.score_queue_size (newer scores dropped when full)", "servoloop_langfuse_score_queue_depth"),
    ("gateway/engines/http1.py", "self._idle: deque[_Connection] = deque()"):
        ("idle connections <= max_connections (a semaphore of that size guards every connection)", None),
    ("feedback/sink.py", "self._delivered_batches: deque[list[int]] = deque()"):
        ("delivered batches awaiting confirmation <= max_unconfirmed events", "servoloop_sink_pending_events"),
    ("feedback/spool.py", "self._mem: deque[SpoolRecord] = deque()"):
        ("spool memory + disk <= max_bytes (appends refused beyond)", "servoloop_spool_memory_bytes"),
    ("feedback/graders/worker.py", "self._spent: deque[tuple[float, int]] = deque()"):
        ("entries of the last hour only (popped as they age), each a grading batch within per_hour",
         "servoloop_grading_budget_queue_depth"),
}


def found() -> dict[tuple[str, str], str]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line in path.read_text().splitlines():
                if QUEUE.search(line) and not line.lstrip().startswith("#"):
                    out[(str(path.relative_to(REPO)), line.strip())] = line
    return out


def test_every_queue_in_the_product_is_listed_with_its_bound():
    in_code = found()
    unlisted = [k for k in in_code if not any(k[0] == f and text in k[1] for f, text in QUEUES)]
    assert not unlisted, f"queues without a listed bound (add them to QUEUES with their bound and metric): {unlisted}"
    stale = [k for k in QUEUES if not any(k[0] == f and k[1] in line for f, line in in_code)]
    assert not stale, f"listed queues no longer in the code: {stale}"


def test_every_listed_metric_exists_and_the_bounded_ones_say_how():
    sources = "\n".join((REPO / p).read_text() for p in ("gateway/metrics.py", "gateway/shadow.py", "feedback/sink.py",
                                                          "feedback/spool.py", "gateway/langfuse.py",
                                                          "feedback/graders/worker.py"))
    for (path, _), (bound, metric) in QUEUES.items():
        assert bound, path
        if metric is not None:
            assert f'"{metric}' in sources, (path, metric)
    # maxsize-bounded asyncio queues really pass their bound
    for (path, text), _ in QUEUES.items():
        if "asyncio.Queue(" in text and "transformers" not in path:
            assert re.search(r"asyncio\.Queue\([^)]+\)", text), (path, text)


async def test_the_langfuse_score_queue_reports_its_depth_and_bound():
    """Scores queued while no worker runs show in the gateway's registry; the queue refuses beyond its bound."""
    from prometheus_client import CollectorRegistry

    from gateway.langfuse import LangfuseScores, TraceIndex
    from gateway.settings import LangfuseSettings
    from schemas.events import FeedbackEvent

    registry = CollectorRegistry()
    index = TraceIndex(100)
    scores = LangfuseScores(LangfuseSettings(host="http://127.0.0.1:9", score_queue_size=3), index, registry=registry)
    index._ids.update({f"i{n}": f"{n:032x}" for n in range(5)})
    for n in range(5):
        scores(FeedbackEvent(tenant="t", target_id=f"i{n}", kind="thumbs", thumbs=True))
    assert registry.get_sample_value("servoloop_langfuse_score_queue_depth") == 3
    assert registry.get_sample_value("servoloop_langfuse_score_queue_capacity") == 3
    assert registry.get_sample_value("servoloop_langfuse_scores_total", {"outcome": "dropped"}) == 2


async def test_the_grading_budget_deque_reports_its_depth_per_grader():
    """Each grading batch spent against a grader's hourly budget is one entry, shown per grader; aged ones go."""
    from prometheus_client import CollectorRegistry

    from feedback.graders.settings import GradingSettings
    from feedback.graders.worker import GradingWorker, _Budget

    registry = CollectorRegistry()
    worker = GradingWorker(None, lambda e: None, GradingSettings(), graders={}, registry=registry)  # type: ignore[arg-type]
    budget = worker._budgets.setdefault("judge", _Budget(100))
    for t in (0.0, 10.0, 4000.0):
        budget.spend(t, 5)
    depth = {"grader": "judge"}
    assert registry.get_sample_value("servoloop_grading_budget_queue_depth", depth) == 3
    assert budget.left(4000.0) == 95  # the two entries older than an hour are dropped
    assert registry.get_sample_value("servoloop_grading_budget_queue_depth", depth) == 1
