"""`servoloop ingest` and `servoloop events tail` as an operator runs them, against a real broker."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from feedback.broker import EmbeddedBroker, free_port
from feedback.tail import decode_record, describe, to_json
from schemas.events import (
    DeadLetter,
    Event,
    FeedbackEvent,
    GuardrailEvent,
    InferenceEvent,
    ModelEvent,
    MonitorResult,
    RetrainTrigger,
    encode_event,
)
from schemas.topics import all_topics

SERVOLOOP = str(Path(sys.executable).parent / "servoloop")
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def cli(*args: str, cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SERVOLOOP, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


INFERENCE = InferenceEvent(tenant="acme", ts_ms=T0, request_id="req-1", trace_id="ab" * 16, model="tiny",
                           model_version="v2", tokens_in=12, tokens_out=34, latency_ms=120.5, ttft_ms=8.0)
FEEDBACK = FeedbackEvent(tenant="acme", ts_ms=T0 + 1000, target_id=INFERENCE.event_id, kind="comment",
                         comment="too long, and it \"rambles\"")


@pytest.mark.parametrize("event, words", [
    (INFERENCE, ["2026-01-01T00:00:00.000Z", "inference", "tenant=acme", "model=tiny@v2", "request=req-1",
                 f"trace={'ab' * 16}", f"id={INFERENCE.event_id}", "status=ok", "tokens=12/34", "latency=120.5ms"]),
    (FEEDBACK, ["feedback", f"target={INFERENCE.event_id}", "kind=comment", 'value="too long, and it \\"rambles\\""']),
    (GuardrailEvent(tenant="acme", side="output", action="redact", finding_counts={"email": 2}, inference_id="i1"),
     ["guardrail", "side=output", "action=redact", "findings=email:2", "inference=i1"]),
    (ModelEvent(model="tiny", version_id="v3", state="canary", previous_state="candidate"),
     ["model", "version=v3", "state=candidate->canary", 'tenant=""']),
    (MonitorResult(monitor="quality", metric="thumbs_up_rate", value=0.42, threshold=0.6, status="alert"),
     ["monitor", "monitor=quality", "value=0.42", "threshold=0.6", "status=alert"]),
    (RetrainTrigger(model="tiny", model_version="v2", method="dpo", reason="quality alert"),
     ["retrain", "model=tiny@v2", "method=dpo", 'reason="quality alert"']),
    (DeadLetter.of(b"\xc1", reason="undecodable", detail="bad", source=("p.inferences", 1, 7)),
     ["dead_letter", "source=p.inferences[1]@7", "reason=undecodable", "bytes=1"]),
])
def test_every_event_type_prints_as_one_line_with_its_key_fields(event: Event, words: list[str]) -> None:
    line = describe(decode_record("p.topic", 0, 5, encode_event(event)))
    assert "\n" not in line
    for w in words:
        assert w in line.split(" ") or w in line, (w, line)


def test_a_record_that_is_no_event_prints_as_undecodable_with_its_reason_and_position() -> None:
    for raw, reason in ((b"\xc1\xc1", "undecodable"), (b"", "undecodable"),
                        (b"\x82\xa4type\xa8telepath\xa8event_id\xa1x", "unknown_type")):
        record = decode_record("p.inferences", 2, 9, raw)
        assert describe(record).startswith(f"UNDECODABLE p.inferences[2]@9 reason={reason} ")
        as_json = json.loads(to_json(record))
        assert as_json["error"]["reason"] == reason and base64.b64decode(as_json["raw_base64"]) == raw
    assert json.loads(to_json(decode_record("t", 0, 1, encode_event(INFERENCE))))["event"]["tokens_out"] == 34


def test_ingest_has_help_and_refuses_a_setup_it_cannot_run_with_one_clear_line(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    help_ = cli("ingest", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "Usage" in help_.stdout and "external" in help_.stdout

    embedded = cli("ingest", cwd=tmp_path)  # the default broker mode is embedded
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"events": {
        "broker": {"mode": "external", "bootstrap_servers": broker.bootstrap_servers},
        "store": {"kind": "clickhouse", "url": f"http://127.0.0.1:{free_port()}"}}}))
    no_store = cli("ingest", "--config", "cfg.yaml", cwd=tmp_path)
    for r, words in ((embedded, "events.broker.mode is 'embedded'"), (no_store, "store_unavailable")):
        assert r.returncode == 2, r.stderr
        assert words in r.stderr.replace("\n", " ")
        assert "Traceback" not in r.stderr


def test_events_tail_prints_every_record_of_every_topic_and_the_undecodable_ones_as_such(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    broker.create_topics(all_topics(prefix), partitions=2)
    guard = GuardrailEvent(tenant="acme", ts_ms=T0, side="input", action="block", finding_counts={"injection": 1})
    p = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for topic, value in ((prefix + "inferences", encode_event(INFERENCE)), (prefix + "feedback", encode_event(FEEDBACK)),
                         (prefix + "guardrails", encode_event(guard)), (prefix + "inferences", b"\xc1 garbage")):
        p.produce(topic, value, key=b"acme")
    assert p.flush(10) == 0
    where = ["--bootstrap", broker.bootstrap_servers, "--prefix", prefix, "--from-beginning"]

    lines = cli("events", "tail", *where, "--limit", "4", cwd=tmp_path)
    assert lines.returncode == 0, lines.stderr
    out = lines.stdout.splitlines()
    assert sorted(line.split(" ")[1] for line in out if not line.startswith("UNDECODABLE")) == \
        ["feedback", "guardrail", "inference"]
    undecodable = [line for line in out if line.startswith("UNDECODABLE")]
    assert len(undecodable) == 1  # after the inference with the same key: same partition, offset 1
    assert re.fullmatch(rf"UNDECODABLE {re.escape(prefix)}inferences\[[01]\]@1 reason=undecodable detail=.+ bytes=9",
                        undecodable[0]), undecodable
    assert any(f"id={INFERENCE.event_id}" in line and "tokens=12/34" in line for line in out)

    only_feedback = cli("events", "tail", *where, "--type", "feedback", "--json", "--limit", "1", cwd=tmp_path)
    assert only_feedback.returncode == 0, only_feedback.stderr
    record = json.loads(only_feedback.stdout)
    assert record["topic"] == prefix + "feedback" and record["event"]["event_id"] == FEEDBACK.event_id
    assert record["event"]["comment"] == FEEDBACK.comment

    bad_type = cli("events", "tail", *where, "--type", "telepathy", cwd=tmp_path)
    assert bad_type.returncode == 2 and "unknown type telepathy" in bad_type.stderr.replace("\n", " ")
    no_broker = cli("events", "tail", "--limit", "1", cwd=tmp_path)  # embedded default: no address to read
    assert no_broker.returncode == 2 and "--bootstrap" in no_broker.stderr and "Traceback" not in no_broker.stderr

