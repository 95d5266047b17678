"""Typed errors shared by every component, each with a stable machine-readable code.

Front ends map `ErrorKind` to an HTTP status or a gRPC code in exactly one place each
(`gateway/http/errors.py`, `gateway/grpc/errors.py`); nothing else decides a status.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorKind(StrEnum):
    INVALID_ARGUMENT = "invalid_argument"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ServoloopError(Exception):
    """Base of every error servoloop raises on purpose; `code` is stable and safe to show clients."""

    kind: ErrorKind = ErrorKind.INTERNAL
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}


class InvalidRequest(ServoloopError):
    kind = ErrorKind.INVALID_ARGUMENT
    code = "invalid_request"


class PayloadTooLarge(ServoloopError):
    kind = ErrorKind.PAYLOAD_TOO_LARGE
    code = "request_too_large"


class PromptTooLong(ServoloopError):
    kind = ErrorKind.INVALID_ARGUMENT
    code = "context_length_exceeded"


class Unauthenticated(ServoloopError):
    kind = ErrorKind.UNAUTHENTICATED
    code = "invalid_api_key"


class PermissionDenied(ServoloopError):
    kind = ErrorKind.PERMISSION_DENIED
    code = "insufficient_scope"


class NotFound(ServoloopError):
    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ServoloopError):
    kind = ErrorKind.CONFLICT
    code = "conflict"


class RateLimited(ServoloopError):
    """Over a rate, token or concurrency limit; `retry_after_s` says when a retry can succeed."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, limit: str):
        super().__init__(message, details={"limit": limit, "retry_after_s": round(retry_after_s, 3)})
        self.retry_after_s = retry_after_s
        self.limit = limit


class EngineUnavailable(ServoloopError):
    """An engine could not serve (connection refused, upstream 5xx, timeout); the router may fall back."""

    kind = ErrorKind.UNAVAILABLE
    code = "engine_unavailable"


class DeadlineExceeded(ServoloopError):
    kind = ErrorKind.DEADLINE_EXCEEDED
    code = "deadline_exceeded"


class FailedPrecondition(ServoloopError):
    kind = ErrorKind.FAILED_PRECONDITION
    code = "failed_precondition"


class ConfigError(ServoloopError):
    """Settings, a policy file or a recipe is invalid; the message names the file and the field."""

    kind = ErrorKind.INVALID_ARGUMENT
    code = "invalid_config"
