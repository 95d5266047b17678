"""Transformers + PEFT engine: generation in worker threads, streamed back to the event loop.

The fallback where vLLM is not installed. Requests run concurrently up to `max_concurrency`; PEFT's
active adapter is model-wide state, so requests are grouped by adapter (`AdapterGate`): requests for
the same adapter run together, a request for another waits until those finish.

Many adapters stay loaded in the one PEFT model (`load_adapter(name)`, `set_adapter`), at most
`max_loaded_adapters` (an `AdapterCache`: least recently used out, loaded again on its next request). A load
or an eviction takes the model alone for its few milliseconds, like an adapter switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from gateway.engines import collect
from gateway.engines.adapters import AdapterCache
from gateway.engines.prompt import encode_prompt
from gateway.request import Chunk, InferenceRequest, SamplingParams, Usage
from gateway.settings import ModelSettings
from schemas.errors import EngineUnavailable, NotFound

log = logging.getLogger(__name__)
_DONE = object()


class AdapterGate:
    """Lets requests of one adapter run together and makes others wait for the switch.

    Fair: once a request for another adapter (or an adapter load) waits, newcomers for the running adapter
    queue behind it, so a steady stream of one version can never starve a hot swap or the other canary arm.
    """

    def __init__(self) -> None:
        self._active: str | None = None
        self._running = 0
        self._waiting: Counter[str | None] = Counter()  # adapter -> requests waiting for it
        self._cond = asyncio.Condition()

    def _may_enter(self, adapter: str | None) -> bool:
        if self._running == 0:
            return True
        return self._active == adapter and sum(self._waiting.values()) == self._waiting[adapter]

    @asynccontextmanager
    async def use(self, adapter: str | None) -> AsyncIterator[None]:
        async with self._cond:
            if not self._may_enter(adapter):
                self._waiting[adapter] += 1
                try:
                    await self._cond.wait_for(lambda: self._may_enter(adapter))
                finally:
                    self._waiting[adapter] -= 1
                    if not self._waiting[adapter]:
                        del self._waiting[adapter]
            self._active = adapter
            self._running += 1
        try:
            yield
        finally:
            async with self._cond:
                self._running -= 1
                self._cond.notify_all()


class IncrementalText:
    """Decodes generated token ids to text deltas, honouring stop strings (never emits part of one)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self._decode = decode
        self._stop = stop
        self._ids: list[int] = []
        self._emitted = 0
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """Append tokens; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._ids.extend(ids)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            return ""
        for s in self._stop:
            at = text.find(s, max(0, self._emitted - len(s)))
            if at != -1:
                self.stopped = True
                return self._take(text, at)
        return self._take(text, len(text) - self._held_back(text))

    def flush(self) -> str:
        return "" if self.stopped else self._take(self._decode(self._ids), None)

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self._emitted)
        delta = text[self._emitted : end]
        self._emitted = end
        return delta

    @property
    def n_tokens(self) -> int:
        return len(self._ids)


class TransformersEngine:
    kind = "transformers"
    # load_adapter runs one forward pass through the new adapter while it holds the model alone, so a hot swap
    # needs no separate warm-up generation (which would wait for a turn of the adapter gate under load).
    warms_adapters_on_load = True

    def __init__(self, settings: ModelSettings):
        if not settings.path:
            raise ValueError(f"model {settings.name!r}: the transformers engine needs a model path")
        self._settings = settings
        self._path = settings.path
        self._model: Any = None
        self._tokenizer: Any = None
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="tf-generate")
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._gate = AdapterGate()
        self.adapter_cache = AdapterCache(settings.max_loaded_adapters, self._cache_load, self._cache_evict)
        self._model_lock = threading.Lock()  # guards PEFT wrapping and adapter loading against generation
        self._adapter_layers_on = True  # PEFT's state after wrapping or loading: adapter layers enabled

    @property
    def _adapters(self) -> dict[str, str]:
        """Registered adapters, name -> path (loaded now or on their next request)."""
        return self.adapter_cache.registered_paths()

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        import peft  # noqa: F401  (imported now, at start-up: the first hot swap would otherwise pay ~0.2 s for it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path, local_files_only=True)
            dtype = getattr(torch, self._settings.dtype)
            model = AutoModelForCausalLM.from_pretrained(self._path, local_files_only=True, dtype=dtype)
        except OSError as e:
            raise EngineUnavailable(f"cannot load model from {self._path}: {e}") from e
        self._model = model.eval()
        configured = model.generation_config.eos_token_id
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        self._eos_ids = frozenset(i for i in [*configured, self._tokenizer.eos_token_id] if i is not None)
        log.info("transformers engine loaded %s", self._path)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def count_prompt_tokens(self, request: InferenceRequest) -> int:
        return len(encode_prompt(self._tokenizer, request))

    async def generate(self, request: InferenceRequest, *, adapter: str | None = None) -> Chunk:
        return await collect(self.stream(request, adapter=adapter))

    async def stream(self, request: InferenceRequest, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        if self._model is None:
            raise EngineUnavailable("transformers engine is not started")
        if adapter is not None and not self.adapter_cache.registered(adapter):
            raise NotFound(f"adapter {adapter!r} is not loaded", param="model")
        if adapter is None:
            async for chunk in self._stream(request, None):
                yield chunk
            return
        async with self.adapter_cache.use(adapter):  # loads it on a miss; never evicted while this request runs
            async for chunk in self._stream(request, adapter):
                yield chunk

    async def _stream(self, request: InferenceRequest, adapter: str | None) -> AsyncIterator[Chunk]:
        ids = encode_prompt(self._tokenizer, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async with self._slots, self._gate.use(adapter):
            job = loop.run_in_executor(self._pool, self._generate, ids, request.params, adapter, cancel, emit)
            try:
                while (item := await queue.get()) is not _DONE:
                    yield Chunk(item)
                finish, n_out = await job
                yield Chunk("", finish, Usage(len(ids), n_out))
            finally:
                cancel.set()
                if not job.done():  # let the worker see the flag and return its thread to the pool
                    with contextlib.suppress(Exception):
                        await asyncio.shield(job)

    def _generate(
        self, ids: list[int], params: SamplingParams, adapter: str | None, cancel: threading.Event,
        emit: Callable[[Any], None],
    ) -> tuple[str, int]:
        """Runs in a worker thread: generate, pushing text deltas through `emit`."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tok = self._tokenizer
        text = IncrementalText(lambda t: tok.decode(t, skip_special_tokens=True), params.stop)
        eos_ids = self._eos_ids
        eos = next(iter(eos_ids), None)

        class Streamer(BaseStreamer):
            prompt_seen = False
            last: int | None = None

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                new = value.reshape(-1).tolist()
                self.last = new[-1] if new else self.last
                if delta := text.add([t for t in new if t not in eos_ids]):
                    emit(delta)

            def end(self) -> None:
                if delta := text.flush():
                    emit(delta)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set() or text.stopped, dtype=torch.bool)

        streamer = Streamer()
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "do_sample": params.temperature > 0,
                                  "min_new_tokens": params.min_tokens}
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        try:
            self._select_adapter(adapter)
            with torch.inference_mode():
                input_ids = torch.tensor([ids])
                self._model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Stop()]),
                    pad_token_id=eos if tok.pad_token_id is None else tok.pad_token_id,
                    eos_token_id=sorted(eos_ids), **kwargs,
                )
        except Exception as e:
            emit(_DONE)
            raise EngineUnavailable(f"generation failed: {type(e).__name__}: {e}") from e
        emit(_DONE)
        hit_eos = streamer.last in eos_ids
        n_out = text.n_tokens + (1 if hit_eos else 0)
        finish = "stop" if text.stopped or hit_eos or cancel.is_set() else "length"
        return finish, n_out

    def _select_adapter(self, adapter: str | None) -> None:
        """Put the model in `adapter`'s state (None: adapter layers off), if it is not already.

        Model-wide and idempotent: the gate lets only requests of one adapter run at a time, so they all want
        the same state. (A per-request `disable_adapter()` context would be wrong here: the first of two
        concurrent base requests to finish would switch the adapter back on under the other.)
        """
        model = self._model
        if not hasattr(model, "peft_config"):
            return
        with self._model_lock:
            if adapter is None:
                if self._adapter_layers_on:
                    model.base_model.disable_adapter_layers()
                    self._adapter_layers_on = False
                return
            if not self._adapter_layers_on:
                model.base_model.enable_adapter_layers()
                self._adapter_layers_on = True
            if model.active_adapter != adapter:
                model.set_adapter(adapter)

    async def load_adapter(self, name: str, path: str) -> None:
        """Register `name` and load it now (a hot swap wants it warm before it routes traffic to it)."""
        await self.register_adapter(name, path)
        await self.adapter_cache.ensure(name)

    async def register_adapter(self, name: str, path: str) -> None:
        """Make `name` servable without loading it: it loads on its first request."""
        current = self.adapter_cache.path(name)
        if current == path:
            return
        if current is not None:  # a new version under the same name
            await self.adapter_cache.unregister(name)
        self.adapter_cache.register(name, path)

    async def _cache_load(self, name: str, path: str) -> None:
        async with self._gate.use(f"\0load:{name}"):  # no generation runs while the model changes
            await asyncio.get_running_loop().run_in_executor(self._pool, self._load_and_warm, name, path)

    async def _cache_evict(self, name: str) -> None:
        async with self._gate.use(f"\0unload:{name}"):
            await asyncio.get_running_loop().run_in_executor(self._pool, self._unload_adapter, name)

    def _load_and_warm(self, name: str, path: str) -> None:
        import torch

        self._load_adapter(name, path)
        self._select_adapter(name)
        with torch.inference_mode():
            self._model(input_ids=torch.tensor([[self._tokenizer.bos_token_id or 0]]))

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._model_lock:
            if name in (getattr(self._model, "peft_config", None) or {}):
                self._model.delete_adapter(name)
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(path, adapter_name=name)
                self._model.base_model.enable_adapter_layers()  # a known state; the next request sets its own
            else:
                self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name).eval()
            self._adapter_layers_on = True

    async def unload_adapter(self, name: str) -> None:
        await self.adapter_cache.unregister(name)  # NotFound when never loaded; evicts it when it is loaded

    def _unload_adapter(self, name: str) -> None:
        with self._model_lock:
            self._model.delete_adapter(name)
            if not self._model.peft_config:  # none left: PEFT would still name the deleted one active; unwrap
                self._model = self._model.unload().eval()
                self._adapter_layers_on = True
