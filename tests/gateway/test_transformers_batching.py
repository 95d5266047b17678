"""The Transformers engine batches concurrent requests into one generate, each row with its own adapter: greedy
answers and usage equal those of the same request alone, rows stream on their own, a cancelled row leaves the
others untouched, and an adapter unloaded while its rows run waits for them. Real tiny model, real PEFT LoRAs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.engines import lora_batch
from gateway.engines.batching import batch_key
from gateway.engines.transformers import TransformersEngine
from gateway.request import ChatMessage, Chunk, InferenceRequest, SamplingParams
from schemas.errors import NotFound
from tests.conftest import tiny_settings
from tests.gateway.hotswap_support import make_lora

PROMPTS = ["How do I reset my password?", "Hi", "What are your opening hours? Please list every day of the week.",
           "Why was my card declined?"]
ADAPTERS = ("a", "b", "c")


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`a`, `b`: rank 4 on q/v; `c`: rank 8 on q/k/v/o (the stacked weights pad ranks and absent layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("batching-loras")
    out = {name: str(make_lora(tiny_model_dir, root / name, 40 + i).path) for i, name in enumerate(ADAPTERS[:2])}
    torch.manual_seed(42)
    wide = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    wide.save_pretrained(root / "c")
    out["c"] = str(root / "c")
    return out


@pytest.fixture(scope="module")
async def engine(tiny_model_dir: Path, loras: dict[str, str]) -> AsyncIterator[TransformersEngine]:
    """A wide batch window, so that requests started together always share a batch."""
    e = TransformersEngine(tiny_settings(tiny_model_dir, engine="transformers", max_batch=8, batch_window_ms=300.0))
    await e.start()
    for name, path in loras.items():
        await e.load_adapter(name, path)
    yield e
    await e.aclose()


def _request(prompt: str, max_tokens: int = 12, **kw: object) -> InferenceRequest:
    return InferenceRequest(model="tiny", operation="chat", params=SamplingParams(max_tokens=max_tokens,
                                                                                   temperature=0.0, **kw),  # type: ignore[arg-type]
                            messages=(ChatMessage("user", prompt),))


# rows: (prompt, adapter, max_tokens) — different adapters, the base model, different prompt lengths and limits
ROWS = [(PROMPTS[0], "a", 12), (PROMPTS[1], "b", 12), (PROMPTS[2], None, 12), (PROMPTS[3], "c", 5),
        (PROMPTS[1], "a", 12), (PROMPTS[2], "c", 3)]


async def _alone(engine: TransformersEngine) -> list[Chunk]:
    out = []
    for prompt, adapter, n in ROWS:
        out.append(await engine.generate(_request(prompt, n), adapter=adapter))
    return out


async def test_a_mixed_adapter_batch_gives_each_row_the_answer_and_usage_it_gets_alone(
        engine: TransformersEngine) -> None:
    alone = await _alone(engine)
    before = engine.batch_stats()
    together = await asyncio.gather(*(engine.generate(_request(p, n), adapter=a) for p, a, n in ROWS))
    stats = engine.batch_stats()
    assert stats.batches - before.batches == 1 and stats.largest == len(ROWS)  # one generate served every row
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.usage for c in together] == [c.usage for c in alone]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
    for chunk, (prompt, _, n) in zip(together, ROWS, strict=True):
        assert chunk.usage is not None
        assert chunk.usage.prompt_tokens == engine.count_prompt_tokens(_request(prompt))  # padding not counted
        assert 0 < chunk.usage.completion_tokens <= n
    assert len({c.text for c in together[:4]}) == 4  # the adapters really differ


async def test_rows_stream_on_their_own_and_a_cancelled_row_leaves_the_others_unchanged(
        engine: TransformersEngine) -> None:
    alone = await _alone(engine)

    async def consume(i: int) -> list[str]:
        prompt, adapter, n = ROWS[i]
        chunks = []
        stream = engine.stream(_request(prompt, n), adapter=adapter)
        async for chunk in stream:
            chunks.append(chunk)
            if i == 0:  # the client of row 0 goes away after its first piece of text
                await stream.aclose()  # type: ignore[attr-defined]
                break
        return chunks  # type: ignore[return-value]

    results = await asyncio.gather(*(consume(i) for i in range(len(ROWS))))
    assert len(results[0]) == 1 and results[0][0].finish_reason is None
    for i, chunks in enumerate(results[1:], start=1):
        assert "".join(c.text for c in chunks) == alone[i].text
        assert chunks[-1].usage == alone[i].usage and chunks[-1].finish_reason == alone[i].finish_reason
        if alone[i].usage and alone[i].usage.completion_tokens > 3:
            assert sum(1 for c in chunks if c.text) > 1  # streamed token by token, not in one piece


async def test_a_batch_whose_rows_are_all_cancelled_stops(engine: TransformersEngine) -> None:
    streams = [engine.stream(_request("Once upon a time", 1000, min_tokens=1000), adapter=a) for a in ("a", None)]
    for s in streams:
        await anext(s)  # type: ignore[call-overload]
    for s in streams:
        await s.aclose()  # type: ignore[attr-defined]
    before = engine.batch_stats().batches
    short = await asyncio.wait_for(engine.generate(_request(PROMPTS[0], 2), adapter="a"), 60)
    assert short.usage is not None and short.usage.completion_tokens == 2
    assert engine.batch_stats().batches == before + 1  # the abandoned batch ended: this one ran after it


async def test_an_adapter_unloaded_under_running_rows_waits_for_them_and_then_refuses(
        engine: TransformersEngine, loras: dict[str, str]) -> None:
    expected = (await engine.generate(_request(PROMPTS[0]), adapter="b")).text
    running = [asyncio.create_task(engine.generate(_request(PROMPTS[0]), adapter="b")) for _ in range(3)]
    await asyncio.sleep(0.05)  # queued in the batcher's window
    await engine.unload_adapter("b")
    assert [(await t).text for t in running] == [expected] * 3
    with pytest.raises(NotFound):
        await engine.generate(_request(PROMPTS[0]), adapter="b")
    await engine.load_adapter("b", loras["b"])
    assert (await engine.generate(_request(PROMPTS[0]), adapter="b")).text == expected


async def test_stacked_lora_rows_compute_what_peft_computes_per_row(engine: TransformersEngine) -> None:
    import torch

    model: Any = engine._model
    assert lora_batch.supported(model)
    adapters = ["a", None, "c", "b", "c"]
    ids = torch.tensor([(engine._tokenizer.encode(p, add_special_tokens=False) * 4)[:4] for p in PROMPTS + PROMPTS[:1]])

    def both() -> tuple[Any, Any]:
        with torch.inference_mode():
            engine._select_adapter("a")  # PEFT's mixed batches need the adapter layers on
            peft = model(input_ids=ids, adapter_names=[a or "__base__" for a in adapters]).logits
            engine._select_adapter(None)
            with lora_batch.MixedLoRA().rows(model, adapters):
                stacked = model(input_ids=ids).logits
        return peft, stacked

    peft, stacked = await engine._on_model_thread(both)
    assert torch.allclose(peft, stacked, atol=1e-5)
    assert not torch.allclose(stacked[0], stacked[1], atol=1e-3)  # the adapters change the logits


def test_only_compatible_sampling_shares_a_batch() -> None:
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    assert batch_key(greedy) == batch_key(SamplingParams(max_tokens=99, temperature=0.0, stop=("x",)))
    assert batch_key(greedy) != batch_key(SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2))
    warm = SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9)
    assert batch_key(warm) == batch_key(SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9))
    assert batch_key(warm) != batch_key(SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9))
    seeded = SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, seed=1)
    assert batch_key(seeded) != batch_key(SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, seed=1))
