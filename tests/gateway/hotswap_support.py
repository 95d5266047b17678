"""Hot-swap test support: real LoRA adapters of the tiny model, and model events published the registry's way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from feedback.kafka import ConfluentDownstream
from feedback.sink import EventRecord
from schemas.artifacts import tree_sha256
from schemas.events import ModelEvent, encode_event
from schemas.topics import topic_name


@dataclass(frozen=True)
class Adapter:
    path: Path
    sha256: str


def make_lora(base_dir: Path, out: Path, seed: int) -> Adapter:
    """A rank-4 LoRA on q/v with random (not zero) weights, so its answers differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return Adapter(out, tree_sha256(out))


@pytest.fixture(scope="session")
def lora_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Adapter]:
    """Two different adapters, `v1` and `v2`, made once per session."""
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(tiny_model_dir, root / name, seed) for seed, name in enumerate(("v1", "v2"), start=1)}


def model_event(model: str, version: str, state: str, adapter: Adapter | None = None, *, share: float = 0.0,
                previous: str = "", sha256: str | None = None) -> ModelEvent:
    """A lifecycle row as the registry writes it (`adapter` None: the base model's version)."""
    return ModelEvent(model=model, version_id=version, base_model="tiny-chat", state=state, previous_state=previous,
                      adapter_path=str(adapter.path) if adapter else "",
                      artifact_sha256=(adapter.sha256 if sha256 is None else sha256) if adapter else "",
                      canary_share=share, actor="test")


class ModelEventProducer:
    """The sink's Kafka producer writing model events to `<prefix>models` (one connection, kept open)."""

    def __init__(self, bootstrap: str, prefix: str):
        self._downstream = ConfluentDownstream(bootstrap, linger_ms=0)
        self._topic = topic_name(ModelEvent.topic, prefix)

    async def send(self, events: Sequence[ModelEvent]) -> None:
        """Returns when the broker acknowledged every event."""
        await self._downstream.send([EventRecord(self._topic, e.partition_key(), e.event_id, encode_event(e))
                                     for e in events])

    async def aclose(self) -> None:
        await self._downstream.aclose()


async def publish(bootstrap: str, prefix: str, events: Sequence[ModelEvent]) -> None:
    """Produce `events` to `<prefix>models` with the sink's producer (acknowledged when this returns)."""
    producer = ModelEventProducer(bootstrap, prefix)
    try:
        await producer.send(events)
    finally:
        await producer.aclose()
