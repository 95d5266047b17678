"""HTTP binding of the Feedback API: `POST /v1/feedback`, JSON in and out, onto `gateway.feedback`.

201 with `{"id", "status": "accepted"}` for new feedback; 200 with the same body (and the header
`Idempotent-Replayed: true`) when an idempotency key replays an accepted submission. The key comes
in the body's `idempotency_key` or the `Idempotency-Key` header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictFloat, StrictStr
from starlette.responses import Response

from gateway.feedback import FeedbackSubmission
from gateway.http.openai import body_schema, json_response, parse, read_body
from schemas.errors import InvalidRequest

if TYPE_CHECKING:
    from gateway.server import Gateway


def _thumbs(value: Any) -> Any:
    if value in ("up", "down"):
        return value == "up"
    if value is None or isinstance(value, bool):
        return value
    raise ValueError("must be 'up', 'down', true or false")


class PreferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preferred_id: StrictStr
    other_id: StrictStr


class FeedbackIn(BaseModel):
    """The request body: `target_id`, optional `metric_name`, and exactly one value."""

    model_config = ConfigDict(extra="forbid")

    target_id: StrictStr
    metric_name: StrictStr = ""
    thumbs: Annotated[bool | None, BeforeValidator(_thumbs)] = None
    rating: StrictFloat | None = None
    comment: StrictStr | None = None
    correction: StrictStr | None = None
    preference: PreferenceIn | None = None
    idempotency_key: StrictStr | None = None
    user: StrictStr = ""


def build_feedback_router(gw: Gateway) -> APIRouter:
    api = APIRouter()
    settings = gw.settings.feedback

    @api.post("/v1/feedback", tags=["feedback"], status_code=201,
              openapi_extra=body_schema(FeedbackIn))
    async def submit_feedback(request: Request) -> Response:
        principal = gw.auth.authenticate(request.headers.get("authorization"))
        principal.require("feedback")
        wire: FeedbackIn = parse(FeedbackIn, await read_body(request, settings.max_body_bytes))
        header_key, body_key = request.headers.get("idempotency-key"), wire.idempotency_key or None
        if header_key is not None and body_key is not None and header_key != body_key:
            raise InvalidRequest("the Idempotency-Key header and 'idempotency_key' differ; send one",
                                 param="idempotency_key")
        p = wire.preference
        receipt = await gw.feedback.submit(principal, FeedbackSubmission(
            target_id=wire.target_id, metric_name=wire.metric_name, thumbs=wire.thumbs, rating=wire.rating,
            comment=wire.comment, correction=wire.correction,
            preference=(p.preferred_id, p.other_id) if p is not None else None,
            idempotency_key=body_key or header_key or "", user=wire.user,
        ))
        body = {"id": receipt.id, "status": "accepted"}
        if receipt.replayed:
            return json_response(body, status=200, headers={"Idempotent-Replayed": "true"})
        return json_response(body, status=201)

    return api
