"""The one mapping from servoloop errors to gRPC status codes and trailing metadata."""

from __future__ import annotations

import grpc
from gateway.limits import retry_after_header
from schemas.errors import ErrorKind, RateLimited, ServoloopError

STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.PAYLOAD_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_of(err: ServoloopError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(status code, message, trailing metadata) for an error; the code string travels in `servoloop-error-code`."""
    trailers: list[tuple[str, str]] = [("servoloop-error-code", err.code)]
    if err.param:
        trailers.append(("servoloop-error-param", err.param))
    if isinstance(err, RateLimited):
        trailers.append(("retry-after", retry_after_header(err.retry_after_s)))
    if "reset_at" in err.details:  # a spent budget: when its period resets (ISO 8601, UTC)
        trailers.append(("servoloop-reset-at", str(err.details["reset_at"])))
    return STATUS[err.kind], f"{err.code}: {err.message}", tuple(trailers)
