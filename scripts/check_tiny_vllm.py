"""Manual check: vLLM (CPU, in-process) loads the tiny model and streams the same greedy text as transformers.

Usage: .venv/bin/python scripts/check_tiny_vllm.py [MODEL_DIR] [--dtype float32|bfloat16] [--build]
Builds the model first when MODEL_DIR has none (or with --build). Prints timings and both outputs;
exits 1 when the greedy texts differ.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "How do I boil an egg?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}],
)
MAX_TOKENS = 32


def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> tuple[list[str], float]:
    """Greedy continuations from transformers, and tokens per second over all prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    import torch

    texts, n, started = [], 0, time.perf_counter()
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):]
        n += len(out)
        texts.append(tok.decode(out, skip_special_tokens=True))
    return texts, n / (time.perf_counter() - started)


async def vllm_stream(model_dir: Path, dtype: str, prompts: list[list[int]]) -> tuple[list[str], dict[str, float]]:
    """Stream each prompt through an in-process AsyncLLM; returns the texts and timings."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.perf_counter()
    args = AsyncEngineArgs(model=str(model_dir), enforce_eager=True, enable_lora=True, max_lora_rank=16,
                           max_model_len=2048, dtype=dtype)
    engine = AsyncLLM.from_engine_args(args)
    timings = {"start_s": time.perf_counter() - started}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, output_kind=RequestOutputKind.DELTA)
    texts, ttfts, n, gen_started = [], [], 0, time.perf_counter()
    try:
        for i, ids in enumerate(prompts):
            t0, first, parts = time.perf_counter(), None, []
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=f"check-{i}"):
                first = first or time.perf_counter() - t0
                parts.append(out.outputs[0].text)
                n += len(out.outputs[0].token_ids)
            ttfts.append(first or 0.0)
            texts.append("".join(parts))
        timings["tokens_per_s"] = n / (time.perf_counter() - gen_started)
        timings["ttft_ms"] = 1000 * sum(ttfts) / len(ttfts)
        batch_started = time.perf_counter()
        batch = await asyncio.gather(*(_count(engine, ids, params, f"batch-{i}") for i, ids in enumerate(prompts * 8)))
        timings["batch24_tokens_per_s"] = sum(batch) / (time.perf_counter() - batch_started)
    finally:
        engine.shutdown()
        del engine  # collect it now: AsyncLLM.__del__ at interpreter exit fails on half-torn-down modules
        gc.collect()
    return texts, timings


async def _count(engine: object, ids: list[int], params: object, request_id: str) -> int:
    from vllm.inputs import TokensPrompt

    return sum([len(o.outputs[0].token_ids) async for o in engine.generate(  # type: ignore[attr-defined]
        TokensPrompt(prompt_token_ids=ids), params, request_id=request_id)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", nargs="?", default=str(REPO / ".servoloop" / "models" / "tiny-chat"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--build", action="store_true", help="rebuild the model first")
    ns = parser.parse_args()
    model_dir = Path(ns.model_dir)
    if ns.build or not (model_dir / "config.json").exists():
        from retrain.tiny import build_tiny_model

        started = time.perf_counter()
        build_tiny_model(model_dir)
        print(f"build: {time.perf_counter() - started:.1f}s")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    hf_texts, hf_tps = transformers_greedy(model_dir, prompts)
    vllm_texts, timings = asyncio.run(vllm_stream(model_dir, ns.dtype, prompts))
    same = True
    for msgs, a, b in zip(PROMPTS, hf_texts, vllm_texts, strict=True):
        same &= a == b
        print(f"\n> {msgs[-1]['content']}\n  transformers: {a!r}\n  vLLM:         {b!r}  {'(same)' if a == b else '(DIFFERENT)'}")
    print(f"\ndtype={ns.dtype} vLLM start {timings['start_s']:.1f}s, TTFT {timings['ttft_ms']:.0f} ms, "
          f"{timings['tokens_per_s']:.0f} tok/s single, {timings['batch24_tokens_per_s']:.0f} tok/s over 24 concurrent; "
          f"transformers {hf_tps:.0f} tok/s single")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
