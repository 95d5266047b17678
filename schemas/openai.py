"""OpenAI-compatible HTTP wire types (requests validated with pydantic; responses built as dicts).

Unknown fields are ignored, as OpenAI-compatible servers do; known fields are type-checked strictly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ServoloopOptions(BaseModel):
    """Extensions under the `servoloop` key of a request body."""

    model_config = ConfigDict(extra="forbid")
    cache: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    min_tokens: StrictInt | None = None
    user: StrictStr | None = None
    servoloop: ServoloopOptions | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, *, type_: str, code: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    """OpenAI-style error JSON: {"error": {"message", "type", "param", "code", ...}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}
