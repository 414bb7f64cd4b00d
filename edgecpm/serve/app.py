"""The ASGI app: routes, admission (bounded queue), API keys, disconnects, and the uvicorn runner."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgecpm.aio import iterate_in_thread
from edgecpm.control import CancelToken
from edgecpm.errors import EdgecpmError
from edgecpm.serve import protocol
from edgecpm.serve.config import ServeConfig
from edgecpm.serve.errors import APIError, bad_request, not_found, queue_full, too_large, unauthorized
from edgecpm.serve.metrics import Metrics

if TYPE_CHECKING:
    from edgecpm.api import Engine
    from edgecpm.generate import GenerationEvent, GenerationResult

log = logging.getLogger("edgecpm.serve")


@dataclass
class Generation:
    """One admitted request on its way through the model."""

    request: protocol.CompletionRequest
    events: Iterator[GenerationEvent]
    cancel: CancelToken
    accepted: float = field(default_factory=time.perf_counter)


class Server:
    def __init__(self, config: ServeConfig, engine: Engine):
        self.config = config
        self.engine = engine
        self.in_flight = 0
        self.metrics = Metrics(lambda: engine.queue_depth, lambda: self.in_flight)

    # ------------------------------------------------------------------------------ admission
    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.config.api_key.encode()):
            raise unauthorized()

    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        return protocol.parse_body(b"".join(chunks))

    def admit(self) -> None:
        """One model runs one request; `max_queue` more may wait; beyond that, 429 at once."""
        if self.in_flight >= 1 + self.config.max_queue:
            raise queue_full(self.config.max_queue)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    # ------------------------------------------------------------------------------ generation
    def start(self, request: protocol.CompletionRequest) -> Generation:
        """Renders, tokenizes and checks everything (runs in a worker thread: it may compile a grammar)."""
        cancel = CancelToken()
        limits = [t for t in (request.max_time, self.config.request_timeout) if t is not None]
        options: dict[str, Any] = dict(request.options, cancel=cancel, max_time=min(limits) if limits else None)
        try:
            if request.messages is not None:
                events = self.engine.chat_stream(request.messages, tools=request.tools, tool_choice=request.tool_choice,
                                                 response_format=request.response_format, **options)
            else:
                events = self.engine.stream(request.prompt or "", raw=True, **options)
        except EdgecpmError as exc:
            raise _as_api_error(exc) from None
        return Generation(request, events, cancel)

    async def run(self, generation: Generation) -> AsyncIterator[GenerationEvent]:
        async for event in iterate_in_thread(lambda: self._observed(generation), generation.cancel):
            yield event

    def _observed(self, generation: Generation) -> Iterator[GenerationEvent]:
        """The events, timed into the metrics in the worker thread, so a generation whose client left is
        still counted (as "cancelled") when it stops."""
        first = True
        for event in generation.events:
            if event.token_id is not None:
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - generation.accepted)
                    first = False
                else:
                    self.metrics.time_per_token.observe(event.seconds)
            if event.result is not None:
                self.metrics.prompt_tokens.inc(len(event.result.prompt_token_ids))
                self.metrics.completion_tokens.inc(event.result.new_tokens)
                self.metrics.finished.inc(label=event.result.finish_reason)
            yield event

    def reply(self, generation: Generation, result: GenerationResult) -> tuple[dict[str, Any], str]:
        """The assistant message and OpenAI finish reason for a finished chat generation."""
        request = generation.request
        tools = request.tools if request.tool_choice != "none" else None
        reply = self.engine.tool_format.reply(result, tools)
        return reply.message, protocol.finish_reason(reply.finish_reason)


def _as_api_error(exc: EdgecpmError) -> APIError:
    message = str(exc)
    if "context holds" in message:
        return bad_request(message, param="messages", code="context_length_exceeded")
    return bad_request(message, param=exc.field, code="invalid_value")


def create_app(config: ServeConfig, engine: Engine | None = None) -> Starlette:
    config = config.validate()
    if engine is None:
        from edgecpm.api import load

        engine = load(config.bundle, threads=config.threads, kernels=config.kernels, kv_cache=config.kv_cache)
    server = Server(config, engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Start the runtime and the grammar engine's vocabulary view before the first request.
        await asyncio.to_thread(lambda: (engine.backend, engine.constraints.ll_tokenizer))
        yield

    async def chat_completions(request: Request) -> Response:
        return await _completions(request, chat=True)

    async def completions(request: Request) -> Response:
        return await _completions(request, chat=False)

    async def _completions(request: Request, *, chat: bool) -> Response:
        server.check_key(request)
        body = await server.read_json(request)
        parsed = protocol.parse_request(body, chat=chat, served_model=config.served_model,
                                        max_tokens_limit=config.max_tokens_limit, default_max_tokens=config.default_max_tokens)
        server.admit()
        try:
            generation = await asyncio.to_thread(server.start, parsed)
        except BaseException:
            server.release()
            raise
        if parsed.stream:
            return _stream(server, generation, chat=chat)
        try:
            return await _complete(server, generation, request, chat=chat)
        finally:
            server.release()

    async def models(request: Request) -> Response:
        server.check_key(request)
        card = {"id": config.served_model, "object": "model", "created": int(config.bundle.stat().st_mtime), "owned_by": "edgecpm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request: Request) -> Response:
        server.check_key(request)
        if request.path_params["name"] != config.served_model:
            raise not_found(f"the model '{request.path_params['name'][:100]}' does not exist", param="model",
                            code="model_not_found")
        return JSONResponse({"id": config.served_model, "object": "model", "created": int(config.bundle.stat().st_mtime),
                             "owned_by": "edgecpm"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": config.served_model, "queue_depth": engine.queue_depth,
                             "in_flight": server.in_flight})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        server.metrics.requests.inc(label=str(exc.status))
        server.metrics.errors.inc(label=exc.code or exc.type)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else "method_not_allowed")
        return await api_error(request, error)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s", request.url.path, exc_info=config.debug)
        error = APIError(500, f"internal error ({exc.__class__.__name__})" if not config.debug else f"{exc!r}",
                         type="server_error", code="internal_error")
        return await api_error(request, error)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, debug=False,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app


async def _cancel_on_disconnect(request: Request, cancel: CancelToken) -> None:
    """The body is read already, so the next ASGI message is the client going away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.cancel()
            return


async def _complete(server: Server, generation: Generation, request: Request, *, chat: bool) -> Response:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generation.cancel))
    result = None
    try:
        async for event in server.run(generation):
            result = event.result or result
    finally:
        watcher.cancel()
    if result is None:
        raise APIError(500, "the generation ended without a result", type="server_error", code="internal_error")
    model = generation.request.model
    token_usage = protocol.usage(len(result.prompt_token_ids), result.new_tokens)
    server.metrics.requests.inc(label="200")
    if chat:
        message, reason = server.reply(generation, result)
        return JSONResponse(protocol.chat_completion(protocol.new_id("chatcmpl"), model, message, reason, token_usage))
    return JSONResponse(protocol.completion(protocol.new_id("cmpl"), model, result.text,
                                            protocol.finish_reason(result.finish_reason), token_usage))


def _stream(server: Server, generation: Generation, *, chat: bool) -> Response:
    from sse_starlette.sse import EventSourceResponse

    request = generation.request
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    # Tool calls are parsed from the whole answer, so with tools the text is sent once it is complete.
    buffer_text = chat and bool(request.tools) and request.tool_choice != "none"

    def chunk(text: str | None = None, reason: str | None = None, **delta: Any) -> str:
        if chat:
            body = protocol.chat_chunk(request_id, request.model, {**({"content": text} if text is not None else {}), **delta},
                                       reason)
        else:
            body = protocol.completion(request_id, request.model, text or "", reason, None)
        return json.dumps(body, ensure_ascii=False)

    async def events() -> AsyncIterator[str]:
        released = False
        try:
            if chat:
                yield chunk("", role="assistant")
            result = None
            async for event in server.run(generation):
                if event.text and not buffer_text:
                    yield chunk(event.text)
                result = event.result or result
            assert result is not None
            if chat:
                message, reason = server.reply(generation, result)
                if buffer_text and message.get("content"):
                    yield chunk(message["content"])
                if message.get("tool_calls"):
                    calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                    yield chunk(tool_calls=calls)
                yield chunk(reason=reason)
            else:
                yield chunk("", reason=protocol.finish_reason(result.finish_reason))
            if request.include_usage:
                token_usage = protocol.usage(len(result.prompt_token_ids), result.new_tokens)
                yield json.dumps(protocol.usage_chunk(request_id, request.model, token_usage, chat=chat))
            server.metrics.requests.inc(label="200")
            yield "[DONE]"
        except EdgecpmError as exc:  # mid-stream: the status line is sent already, so the error is an event
            error = _as_api_error(exc)
            server.metrics.errors.inc(label=error.code or error.type)
            yield json.dumps(error.body())
        finally:
            generation.cancel.cancel()  # the client went away (or we are done): stop within one step
            if not released:
                released = True
                server.release()

    return EventSourceResponse(events(), ping=15)


def serve(config: ServeConfig) -> None:
    """Runs until SIGINT/SIGTERM; uvicorn then stops accepting and lets in-flight requests finish."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="debug" if config.debug else "info",
                timeout_graceful_shutdown=config.request_timeout, access_log=config.debug)
