"""Transformers + PEFT engine: batched generation on one model thread, streamed back to the event loop.

The fallback where vLLM is not installed. Up to `max_concurrency` requests are admitted at once; those arriving
together are batched (`gateway/engines/batching.py`): one left-padded `generate()` of up to `max_batch` rows, each
row with its own adapter (stacked LoRA weights and batched matmuls, `gateway/engines/lora_batch.py`; PEFT's own
mixed-adapter batches, `adapter_names=[...]`, for adapter kinds that does not cover), so requests of twenty
tenants run together instead of taking turns. Every row streams its own tokens
and stops on its own max_tokens, stop strings, end of sequence or cancellation; the batch ends with its last row.

Many adapters stay loaded in the one PEFT model (`load_adapter(name)`), at most `max_loaded_adapters` (an
`AdapterCache`: least recently used out, loaded again on its next request). A load or an eviction is a job on
the model thread between batches: it never changes the model under a running batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.engines import collect, lora_batch
from gateway.engines.adapters import AdapterCache
from gateway.engines.batching import Batcher, BatchStats, Row
from gateway.engines.prompt import encode_prompt
from gateway.request import Chunk, InferenceRequest, Usage
from gateway.settings import ModelSettings
from schemas.errors import EngineUnavailable, NotFound

log = logging.getLogger(__name__)
BASE = "__base__"  # PEFT's row name for the base model in a mixed-adapter batch


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
    # load_adapter runs one forward pass through the new adapter on the model thread, so a hot swap needs no
    # separate warm-up generation.
    warms_adapters_on_load = True

    def __init__(self, settings: ModelSettings):
        if not settings.path:
            raise ValueError(f"model {settings.name!r}: the transformers engine needs a model path")
        self._settings = settings
        self._path = settings.path
        self._model: Any = None
        self._tokenizer: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tf-load")  # start-up only
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._batcher: Batcher | None = None
        self.adapter_cache = AdapterCache(settings.max_loaded_adapters, self._cache_load, self._cache_evict)
        self._model_lock = threading.Lock()  # guards PEFT wrapping and adapter loading against generation
        self._mixed = lora_batch.MixedLoRA()  # stacked adapter weights for batches of several adapters
        self._adapter_layers_on = True  # PEFT's state after wrapping or loading: adapter layers enabled

    @property
    def _adapters(self) -> dict[str, str]:
        """Registered adapters, name -> path (loaded now or on their next request)."""
        return self.adapter_cache.registered_paths()

    def batch_stats(self) -> BatchStats:
        """Batches run so far, rows served, the largest batch (zeros before start)."""
        return self._batcher.stats() if self._batcher else BatchStats(0, 0, 0, 0)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)
        self._batcher = Batcher(self._run_batch, self._closed_row, max_batch=self._settings.max_batch,
                                window_s=self._settings.batch_window_ms / 1000)

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
        eos = next(iter(sorted(self._eos_ids)), 0)
        self._pad_id = eos if self._tokenizer.pad_token_id is None else self._tokenizer.pad_token_id
        log.info("transformers engine loaded %s", self._path)

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def count_prompt_tokens(self, request: InferenceRequest) -> int:
        return len(encode_prompt(self._tokenizer, request))

    async def generate(self, request: InferenceRequest, *, adapter: str | None = None) -> Chunk:
        return await collect(self.stream(request, adapter=adapter))

    async def stream(self, request: InferenceRequest, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        if self._model is None or self._batcher is None:
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
        assert self._batcher is not None
        ids = encode_prompt(self._tokenizer, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        row = Row(ids, request.params, adapter, emit)
        async with self._slots:
            try:
                self._batcher.submit(row)
            except RuntimeError as e:
                raise EngineUnavailable("transformers engine is closed") from e
            try:
                while isinstance(item := await queue.get(), str):
                    yield Chunk(item)
                if isinstance(item, BaseException):
                    raise item
                finish, n_out = item
                yield Chunk("", finish, Usage(len(ids), n_out))
            finally:
                row.cancel.set()  # a no-op once finished; otherwise the row stops emitting (and the batch, if last)

    def _closed_row(self, row: Row) -> None:
        row.emit(EngineUnavailable("transformers engine is closed"))

    def _run_batch(self, rows: list[Row]) -> None:
        """On the model thread: one batched generate for `rows`, each finished through its own `emit`."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        loaded = getattr(self._model, "peft_config", None) or {}
        for row in [r for r in rows if r.adapter is not None and r.adapter not in loaded]:
            row.emit(NotFound(f"adapter {row.adapter!r} is not loaded", param="model"))  # unloaded while queued
            rows.remove(row)
        if not rows:
            return
        tok = self._tokenizer
        eos_ids = self._eos_ids
        states = [_RowState(row, IncrementalText(lambda t: tok.decode(t, skip_special_tokens=True), row.params.stop))
                  for row in rows]

        class Rows(StoppingCriteria):
            """Each step's new token per row: streamed to its request; returns which rows are finished."""

            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                for state, token in zip(states, input_ids[:, -1].tolist(), strict=True):
                    state.add(token, eos_ids)
                return torch.tensor([s.done for s in states], dtype=torch.bool)

        params = rows[0].params  # every row shares its batch key: sampling and min_tokens are the same
        kwargs: dict[str, Any] = {"max_new_tokens": max(r.params.max_tokens for r in rows),
                                  "do_sample": params.temperature > 0, "min_new_tokens": params.min_tokens}
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:  # a seeded row runs alone (batch_key)
                torch.manual_seed(params.seed)
        adapters = {r.adapter for r in rows}
        per_row: Any = contextlib.nullcontext()
        select = next(iter(adapters))
        if len(adapters) > 1 and lora_batch.supported(self._model):  # rows of different adapters, batched bmm
            per_row, select = self._mixed.rows(self._model, [r.adapter for r in rows]), None
        elif len(adapters) > 1:  # PEFT picks each row's adapter per layer (slower: a loop over the adapters)
            kwargs["adapter_names"] = [r.adapter or BASE for r in rows]
            select = next(a for a in adapters if a is not None)
        width = max(len(r.ids) for r in rows)
        input_ids = torch.tensor([[self._pad_id] * (width - len(r.ids)) + r.ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows])
        try:
            self._select_adapter(select)
            with torch.inference_mode(), per_row:
                self._model.generate(input_ids, attention_mask=mask, pad_token_id=self._pad_id,
                                     stopping_criteria=StoppingCriteriaList([Rows()]),
                                     eos_token_id=sorted(eos_ids), **kwargs)
        except Exception as e:
            error = EngineUnavailable(f"generation failed: {type(e).__name__}: {e}")
            for state in states:
                if not state.done:
                    state.done = True
                    state.row.emit(error)
            return
        for state in states:
            state.finish()  # rows generate() ended for them (its own length limit)

    def _select_adapter(self, adapter: str | None) -> None:
        """Put the model in `adapter`'s state (None: adapter layers off), if it is not already.

        Model-wide, and only ever called on the model thread: a batch of one adapter runs PEFT's plain path; a
        mixed batch runs with the adapter layers off and adds each row's LoRA term itself (`lora_batch`), or
        names its rows' adapters to PEFT and only needs the adapter layers on.
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

    async def _on_model_thread(self, fn: Callable[[], Any]) -> Any:
        if self._batcher is None:
            raise EngineUnavailable("transformers engine is not started")
        try:
            return await asyncio.wrap_future(self._batcher.run_job(fn))
        except RuntimeError as e:
            raise EngineUnavailable(f"transformers engine: {e}") from e

    async def _cache_load(self, name: str, path: str) -> None:
        await self._on_model_thread(lambda: self._load_and_warm(name, path))  # between batches, never during one

    async def _cache_evict(self, name: str) -> None:
        await self._on_model_thread(lambda: self._unload_adapter(name))  # after every row queued before it

    def _load_and_warm(self, name: str, path: str) -> None:
        import torch

        self._load_adapter(name, path)
        self._select_adapter(name)
        with torch.inference_mode():
            self._model(input_ids=torch.tensor([[self._tokenizer.bos_token_id or 0]]))

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._model_lock:
            self._mixed.invalidate()
            if name in (getattr(self._model, "peft_config", None) or {}):
                self._model.delete_adapter(name)
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(path, adapter_name=name)
                self._model.base_model.enable_adapter_layers()  # a known state; the next batch sets its own
            else:
                self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name).eval()
            self._adapter_layers_on = True

    async def unload_adapter(self, name: str) -> None:
        await self.adapter_cache.unregister(name)  # NotFound when never loaded; evicts it when it is loaded

    def _unload_adapter(self, name: str) -> None:
        with self._model_lock:
            self._mixed.invalidate()
            self._model.delete_adapter(name)
            if not self._model.peft_config:  # none left: PEFT would still name the deleted one active; unwrap
                self._model = self._model.unload().eval()
                self._adapter_layers_on = True


class _RowState:
    """One row's progress through its batch: detokenised text, tokens counted, and whether it is finished."""

    def __init__(self, row: Row, text: IncrementalText) -> None:
        self.row = row
        self.text = text
        self.hit_eos = False
        self.done = False

    def add(self, token: int, eos_ids: frozenset[int]) -> None:
        """The row's next token (padding once the row is finished, then ignored)."""
        if self.done:
            return
        if self.row.cancel.is_set():
            self.done = True  # nobody listens: no end to send
            return
        if token in eos_ids:
            self.hit_eos = True
        elif delta := self.text.add([token]):
            self.row.emit(delta)
        if self.hit_eos or self.text.stopped or self.n_out >= self.row.params.max_tokens:
            self.finish()

    @property
    def n_out(self) -> int:
        return self.text.n_tokens + (1 if self.hit_eos else 0)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if delta := self.text.flush():
            self.row.emit(delta)
        self.row.emit(("stop" if self.text.stopped or self.hit_eos else "length", self.n_out))
