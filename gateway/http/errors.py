"""The one mapping from servoloop errors to HTTP statuses and OpenAI-style JSON error bodies."""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from gateway.limits import retry_after_header
from schemas.errors import ErrorKind, RateLimited, ServoloopError
from schemas.openai import error_body

STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.FAILED_PRECONDITION: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.CANCELLED: 499,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_payload(err: ServoloopError) -> dict:
    status = STATUS[err.kind]
    type_ = ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return error_body(err.message, type_=type_, code=err.code, param=err.param,
                      **({"details": err.details} if err.details else {}))


def error_response(err: ServoloopError) -> Response:
    headers = {}
    if isinstance(err, RateLimited):
        headers["Retry-After"] = retry_after_header(err.retry_after_s)
    if err.kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(msgspec.json.encode(error_payload(err)), status_code=STATUS[err.kind],
                    media_type="application/json", headers=headers)
