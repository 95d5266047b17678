"""Turning a request into model input with the model's own tokenizer and chat template."""

from __future__ import annotations

from typing import Any

from gateway.request import InferenceRequest
from schemas.errors import InvalidRequest


def render_prompt(tokenizer: Any, request: InferenceRequest) -> str:
    """The text the model sees: the chat template applied to the messages, or the raw prompt."""
    if request.operation == "text_completion":
        return request.prompt
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may reject role orders (e.g. two system messages)
        raise InvalidRequest(f"messages do not fit the model's chat template: {e}", param="messages") from e


def encode_prompt(tokenizer: Any, request: InferenceRequest) -> list[int]:
    """Token ids of the rendered prompt (special tokens are part of the template text already).

    Raises InvalidRequest when the prompt renders to no tokens at all (an empty text completion): there is
    nothing to continue from, and the engine would fail on an empty input instead of answering.
    """
    ids = tokenizer.encode(render_prompt(tokenizer, request), add_special_tokens=False)
    if not ids:
        raise InvalidRequest("the prompt is empty: it has no tokens to continue from",
                             param="messages" if request.operation == "chat" else "prompt")
    return ids
