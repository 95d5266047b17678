"""Many adapters at once: throughput and p99 latency with 1 vs 20 active LoRA adapters under mixed-tenant load.

For each engine (vLLM in-process with multi-LoRA, Transformers + PEFT) on the bundled tiny model: `--adapters`
LoRA adapters (r=8 on q/k/v/o, random non-zero weights, one per simulated tenant) are registered with the
engine, which loads each on its first request (`gateway/engines/adapters.py`). Closed-loop load: `--concurrency`
clients, each sending `--requests` / concurrency greedy requests of `--max-tokens` tokens. Scenario `single`:
every request names adapter 0 (one tenant); scenario `mixed`: request i names adapter i mod N (every tenant at
once, interleaved). A warm-up pass loads every adapter first; then each scenario is measured. Target: mixed
throughput >= 70% of single. Each engine runs in its own child process (vLLM's environment stays its own).
The Transformers engine batches concurrent requests (`--max-batch` rows per generate, rows of different adapters
together through PEFT's mixed-adapter batches; `--batch-window-ms`); vLLM batches on its own.

    .venv/bin/python benchmarks/multi_adapter.py            # full run, both engines (several minutes)
    .venv/bin/python benchmarks/multi_adapter.py --quick    # smoke run: few requests
    .venv/bin/python benchmarks/multi_adapter.py --engines transformers --adapters 20 --max-loras 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import pct, write_result

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".servoloop" / "models" / "tiny-chat"
PROMPTS = ["How do I reset my password?", "What are your opening hours?", "Can I change my delivery address?",
           "Why was my card declined?", "How do I cancel my subscription?", "Where is my order?"]


def make_adapters(model_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    """`n` PEFT LoRA adapters with random non-zero weights (seeded), one directory each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        d = out / f"tenant-{i:02d}"
        peft.save_pretrained(d)
        dirs.append(d)
    return dirs


async def run_engine(kind: str, args: argparse.Namespace, adapters: list[Path]) -> dict[str, Any]:
    """Start one engine, register the adapters, run the warm-up and both scenarios; the figures."""
    from gateway.request import ChatMessage, InferenceRequest, SamplingParams
    from gateway.settings import ModelSettings

    settings = ModelSettings(name="tiny", path=str(args.model), engine=kind, dtype="float32", max_model_len=512,
                             max_loras=args.max_loras, max_lora_rank=max(8, args.rank),
                             max_loaded_adapters=max(len(adapters), 1), max_concurrency=args.concurrency,
                             max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)
    t0 = time.monotonic()
    if kind == "vllm":
        from gateway.engines.vllm import VLLMEngine

        engine: Any = VLLMEngine(settings, in_process=True)
    else:
        from gateway.engines.transformers import TransformersEngine

        engine = TransformersEngine(settings)
    await engine.start()
    started_s = time.monotonic() - t0
    names = [f"tenant-{i:02d}" for i in range(len(adapters))]
    for name, path in zip(names, adapters, strict=True):
        await engine.register_adapter(name, str(path))

    async def one(i: int, adapter: str) -> tuple[float, int]:
        request = InferenceRequest(model="tiny", operation="chat", params=SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, min_tokens=args.max_tokens),
            messages=(ChatMessage("user", PROMPTS[i % len(PROMPTS)]),), request_id=uuid.uuid4().hex)
        t = time.perf_counter()
        chunk = await engine.generate(request, adapter=adapter)
        return time.perf_counter() - t, chunk.usage.completion_tokens if chunk.usage else 0

    async def load(pick: list[str]) -> dict[str, Any]:
        queue = list(enumerate(pick))
        latencies: list[float] = []
        tokens = 0

        async def client() -> None:
            nonlocal tokens
            while queue:
                i, adapter = queue.pop(0)
                lat, n = await one(i, adapter)
                latencies.append(lat)
                tokens += n

        batches = engine.batch_stats().batches if hasattr(engine, "batch_stats") else None
        t = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t
        if batches is not None:  # Transformers: how many generate() calls served the scenario
            batches = engine.batch_stats().batches - batches
        return {"batches": batches, "requests": len(pick), "wall_s": round(wall, 3), "requests_per_s": round(len(pick) / wall, 2),
                "tokens_per_s": round(tokens / wall, 1), "p50_ms": round(pct(latencies, 50) * 1000, 1),
                "p99_ms": round(pct(latencies, 99) * 1000, 1), "distinct_adapters": len(set(pick))}

    cache = engine.adapter_cache
    t = time.perf_counter()
    await load(names)  # warm-up: every adapter loads on its first request
    warm = {"wall_s": round(time.perf_counter() - t, 3), **_stats(cache)}
    single = await load([names[0]] * args.requests)
    mixed = await load([names[i % len(names)] for i in range(args.requests)])
    after = _stats(cache)
    await engine.aclose()
    ratio = mixed["requests_per_s"] / single["requests_per_s"]
    return {"engine": kind, "start_s": round(started_s, 1), "adapters": len(names), "max_loras": args.max_loras,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "max_batch": args.max_batch if kind == "transformers" else None,
            "batch_window_ms": args.batch_window_ms if kind == "transformers" else None, "warm_up": warm, "single": single,
            "mixed": mixed, "mixed_over_single": round(ratio, 3), "target_met": ratio >= 0.7, "cache": after}


def _stats(cache: Any) -> dict[str, Any]:
    s = cache.stats()
    return {"loaded": s.loaded, "hits": s.hits, "misses": s.misses, "loads": s.loads, "evictions": s.evictions,
            "load_ms_mean": round(s.load_seconds / s.loads * 1000, 2) if s.loads else None}


def child(args: argparse.Namespace) -> None:
    adapters = sorted(p for p in Path(args.adapter_dir).iterdir() if p.is_dir())
    figures = asyncio.run(run_engine(args.one, args, adapters))
    print("RESULT " + json.dumps(figures), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 40 requests per scenario")
    p.add_argument("--engines", default="vllm,transformers", help="comma-separated: vllm, transformers")
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=8, help="vLLM: adapters in one batch")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=400, help="per scenario")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16, help="Transformers: rows in one batched generate")
    p.add_argument("--batch-window-ms", type=float, default=3.0, help="Transformers: batching window")
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        child(args)
        return
    if args.quick:
        args.requests = min(args.requests, 40)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="multi-adapter-") as tmp:
        make_adapters(args.model, Path(tmp), args.adapters, args.rank)
        for kind in [k.strip() for k in args.engines.split(",") if k.strip()]:
            cmd = [sys.executable, __file__, "--one", kind, "--adapter-dir", tmp, "--rank", str(args.rank),
                   "--max-loras", str(args.max_loras), "--concurrency", str(args.concurrency),
                   "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--model", str(args.model),
                   "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.batch_window_ms)]
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                results[kind] = {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-2000:]}
            else:
                results[kind] = json.loads(line.removeprefix("RESULT "))
            r = results[kind]
            if "error" in r:
                print(f"{kind}: failed ({r['error']}): {r['stderr_tail'][-600:]}")
                continue
            print(f"{kind}: single {r['single']['requests_per_s']} req/s (p99 {r['single']['p99_ms']} ms), "
                  f"{r['adapters']} adapters mixed {r['mixed']['requests_per_s']} req/s (p99 {r['mixed']['p99_ms']} "
                  f"ms): {r['mixed_over_single']:.0%} of single (target 70%: {'met' if r['target_met'] else 'NOT met'})"
                  f"; adapter loads {r['cache']['loads']}, mean {r['cache']['load_ms_mean']} ms")
    name = "multi_adapter_quick" if args.quick else "multi_adapter"
    print(f"written to {write_result(name, {'quick': args.quick, 'engines': results})}")


if __name__ == "__main__":
    main()
