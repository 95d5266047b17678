"""The gRPC front end: Inference.Generate / GenerateStream, Models.List, Feedback.Submit, health, reflection.

Handlers receive raw bytes and parse them here, so a malformed message is INVALID_ARGUMENT (grpcio's
own deserializer failure would be INTERNAL). Deadlines become the request's deadline; a cancelled
call cancels the handler task, which closes the core stream and aborts the engine's generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

import grpc
from gateway.feedback import FeedbackSubmission
from gateway.grpc.errors import status_of
from gateway.service import Admission
from gateway.tracing import response_traceparent
from gateway.validation import make_request
from schemas.errors import InvalidRequest, PayloadTooLarge, ServoloopError
from schemas.pb import feedback_pb2 as fpb
from schemas.pb import inference_pb2 as pb

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)
INFERENCE = "servoloop.v1.Inference"
MODELS = "servoloop.v1.Models"
FEEDBACK = "servoloop.v1.Feedback"
_THUMBS = {fpb.THUMBS_UP: True, fpb.THUMBS_DOWN: False}


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None


async def _abort(context: grpc.aio.ServicerContext, err: ServoloopError) -> None:
    code, message, trailers = status_of(err)
    context.set_trailing_metadata(trailers)
    await context.abort(code, message)


class GrpcFrontEnd:
    def __init__(self, gw: Gateway):
        self._gw = gw
        self._limits = gw.settings.limits

    def _parse(self, raw: bytes) -> pb.GenerateRequest:
        if len(raw) > self._limits.max_request_bytes:
            raise PayloadTooLarge(f"request is {len(raw)} bytes; the limit is {self._limits.max_request_bytes}")
        try:
            return pb.GenerateRequest.FromString(raw)
        except DecodeError as e:
            raise InvalidRequest(f"malformed GenerateRequest: {e}") from None

    def _admit(self, raw: bytes, context: grpc.aio.ServicerContext, *, stream: bool) -> Admission:
        principal = self._gw.auth.authenticate(_metadata(context, "authorization"))
        msg = self._parse(raw)
        p = msg.params
        remaining = context.time_remaining()
        chat = len(msg.messages) > 0
        if chat and msg.prompt:
            raise InvalidRequest("set either 'messages' or 'prompt', not both", param="messages")
        req = make_request(
            limits=self._limits, model=msg.model, operation="chat" if chat else "text_completion",
            messages=[(m.role, m.content) for m in msg.messages], prompt=msg.prompt or None,
            max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None, stop=list(p.stop) or None,
            seed=p.seed if p.HasField("seed") else None,
            min_tokens=p.min_tokens if p.HasField("min_tokens") else None, stream=stream, cache=msg.cache, user=msg.user or None,
            session=_metadata(context, "x-servoloop-session"), traceparent=_metadata(context, "traceparent") or "",
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        return self._gw.service.admit(principal, req, api="grpc")

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        try:
            adm = self._admit(raw, context, stream=False)
            # Unary: ids travel in the trailers, with the status; an early initial-metadata send would cost
            # every call an extra HTTP/2 frame write.
            context.set_trailing_metadata((("servoloop-inference-id", adm.id),
                                           ("traceparent", response_traceparent(adm))))
            c = await self._gw.service.complete(adm)
        except ServoloopError as e:
            await _abort(context, e)  # raises
            raise
        return pb.GenerateResponse(
            id=c.id, model=c.model, text=c.text, finish_reason=c.finish_reason, cached=c.cached,
            model_version=c.model_version,
            usage=pb.Usage(prompt_tokens=c.usage.prompt_tokens, completion_tokens=c.usage.completion_tokens,
                           total_tokens=c.usage.total_tokens),
        )

    async def generate_stream(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            adm = self._admit(raw, context, stream=True)
        except ServoloopError as e:
            await _abort(context, e)
            return
        await context.send_initial_metadata((("servoloop-inference-id", adm.id),
                                             ("traceparent", response_traceparent(adm))))
        chunks = self._gw.service.run(adm)
        try:
            async for chunk in chunks:
                out = pb.GenerateChunk(id=adm.id, text=chunk.text, model_version=adm.model_version)
                if chunk.finish_reason:
                    out.finish_reason = chunk.finish_reason
                if chunk.usage:
                    u = chunk.usage
                    out.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                                total_tokens=u.total_tokens))
                yield out
        except ServoloopError as e:
            await _abort(context, e)
        except Exception:
            log.exception("unhandled error in gRPC GenerateStream")
            await context.abort(grpc.StatusCode.INTERNAL, "internal_error: see the gateway log")
        finally:
            await chunks.aclose()

    async def list_models(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            self._gw.auth.authenticate(_metadata(context, "authorization"))
        except ServoloopError as e:
            await _abort(context, e)
        routes = self._gw.service.router.routes()
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=r.name, engine=r.engine.kind, version=r.version)
                                             for r in routes])

    async def submit_feedback(self, raw: bytes, context: grpc.aio.ServicerContext) -> fpb.SubmitFeedbackResponse:
        try:
            principal = self._gw.auth.authenticate(_metadata(context, "authorization"))
            principal.require("feedback")
            limit = self._gw.settings.feedback.max_body_bytes
            if len(raw) > limit:
                raise PayloadTooLarge(f"request is {len(raw)} bytes; the limit is {limit}")
            try:
                msg = fpb.SubmitFeedbackRequest.FromString(raw)
            except DecodeError as e:
                raise InvalidRequest(f"malformed SubmitFeedbackRequest: {e}") from None
            value = msg.WhichOneof("value")
            if value == "thumbs" and msg.thumbs not in _THUMBS:
                raise InvalidRequest("'thumbs' must be THUMBS_UP or THUMBS_DOWN", param="thumbs")
            receipt = await self._gw.feedback.submit(principal, FeedbackSubmission(
                target_id=msg.target_id, metric_name=msg.metric_name,
                thumbs=_THUMBS[msg.thumbs] if value == "thumbs" else None,
                rating=msg.rating if value == "rating" else None,
                comment=msg.comment if value == "comment" else None,
                correction=msg.correction if value == "correction" else None,
                preference=(msg.preference.preferred_id, msg.preference.other_id) if value == "preference" else None,
                idempotency_key=msg.idempotency_key, user=msg.user,
            ))
        except ServoloopError as e:
            await _abort(context, e)
            raise
        return fpb.SubmitFeedbackResponse(id=receipt.id, replayed=receipt.replayed)


def _guarded(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Never let an unexpected exception surface as a stack trace to the client."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(raw, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in gRPC handler %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal_error: see the gateway log")

    return handler


async def create_grpc_server(gw: Gateway, address: str) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """A started-later aio server bound to `address`; returns (server, bound port, health servicer)."""
    front = GrpcFrontEnd(gw)
    ser = lambda m: m.SerializeToString()  # noqa: E731
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", gw.settings.limits.max_request_bytes + 1024),
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(INFERENCE, {
            "Generate": grpc.unary_unary_rpc_method_handler(_guarded(front.generate), response_serializer=ser),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(front.generate_stream, response_serializer=ser),
        }),
        grpc.method_handlers_generic_handler(MODELS, {
            "List": grpc.unary_unary_rpc_method_handler(_guarded(front.list_models), response_serializer=ser),
        }),
        grpc.method_handlers_generic_handler(FEEDBACK, {
            "Submit": grpc.unary_unary_rpc_method_handler(_guarded(front.submit_feedback), response_serializer=ser),
        }),
    ))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in (INFERENCE, MODELS, FEEDBACK, ""):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if gw.settings.grpc_reflection:
        reflection.enable_server_reflection((INFERENCE, MODELS, FEEDBACK, "grpc.health.v1.Health", reflection.SERVICE_NAME),
                                            server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, port, health
