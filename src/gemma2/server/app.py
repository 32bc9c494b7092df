"""The HTTP layer: routes, the API key, body limits and error shapes. No model logic here.

    state = ServerState(settings)           # 503 everywhere until `state.ready(tokenizer, worker)`
    app = build_app(state)                  # an ASGI app for uvicorn

Every error leaves as OpenAI's `{"error": {...}}` with its status; a bug is a 500 and the server
keeps serving. `/health`, `/version` and `/metrics` need no API key (probes and scrapers).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma2.server.answers import answer
from gemma2.server.calls import Call
from gemma2.server.errors import APIError, bad_request, from_validation, unavailable
from gemma2.server.metrics import ServerMetrics
from gemma2.server.prepare import ServerSettings, chat_ids, check_model, prepare_chat, prepare_completion
from gemma2.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from gemma2.server.responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse, dump, now
from gemma2.server.worker import EngineWorker
from gemma2.tokenizer import Gemma2Tokenizer

log = logging.getLogger("gemma2.server")
PUBLIC_PATHS = ("/health", "/version", "/metrics")


class ServerState:
    """What the routes share: the settings now, the tokenizer and engine thread once loaded."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServerMetrics(settings.model_name, settings.max_batch)
        self.tokenizer: Gemma2Tokenizer | None = None
        self.worker: EngineWorker | None = None
        self.draining = False
        self.created = now()

    def ready(self, tokenizer: Gemma2Tokenizer, worker: EngineWorker) -> None:
        self.tokenizer, self.worker = tokenizer, worker

    def loaded(self) -> tuple[Gemma2Tokenizer, EngineWorker]:
        if self.draining:
            raise unavailable("the server is shutting down")
        if self.tokenizer is None or self.worker is None:
            raise unavailable("the model is loading")
        return self.tokenizer, self.worker


def build_app(state: ServerState) -> FastAPI:
    from gemma2 import __version__

    app = FastAPI(title="gemma2", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        body = APIError(500, f"internal error: {type(error).__name__}: {error}", type="internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.url.path}", type="not_found_error").body(), 404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, _: Exception) -> JSONResponse:
        message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(APIError(405, message).body(), 405)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse(unavailable("the server is shutting down").body(), 503)
        if state.worker is None:
            return JSONResponse(unavailable("the model is loading").body(), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        settings = state.settings
        card = ModelCard(
            id=settings.model_name,
            created=state.created,
            root=settings.model_name,
            max_model_len=settings.max_model_len,
        )
        return dump(ModelList(data=[card]))

    async def generate(request: Request, schema: type[BaseModel], prepare: Any, id_prefix: str) -> Response:
        body = await _parse(request, schema)
        tokenizer, worker = state.loaded()
        prepared = prepare(body, tokenizer, state.settings)
        if prepared.unused:
            log.info("ignored request fields: %s", ", ".join(prepared.unused))
        call = Call(f"{id_prefix}-{uuid.uuid4().hex}", prepared, tokenizer, worker)
        return await answer(call, request, state.settings.model_name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, prepare_chat, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, prepare_completion, "cmpl")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _parse(request, TokenizeRequest)
        tokenizer, _ = state.loaded()
        check_model(state.settings, body.model)
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = chat_ids(tokenizer, messages, body.add_generation_prompt)
        else:
            assert body.prompt is not None
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return dump(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.settings.max_model_len))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _parse(request, DetokenizeRequest)
        tokenizer, _ = state.loaded()
        check_model(state.settings, body.model)
        vocab = state.settings.vocab_size
        bad = [i for i in body.tokens if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"tokens holds {bad[0]}, outside the vocabulary [0, {vocab})", param="tokens")
        return dump(DetokenizeResponse(prompt=tokenizer.decode(body.tokens)))

    return GuardedApp(app, state)  # type: ignore[return-value]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as error:
        raise from_validation(error) from None


class GuardedApp:
    """ASGI middleware before any route: the API key (401) and the body size (413), in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.state.settings
        headers = dict(scope.get("headers") or [])
        if settings.api_key and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {settings.api_key}":
                error = APIError(401, "a valid API key is needed (Authorization: Bearer KEY)", "authentication_error")
                await _send_error(send, error, "invalid_api_key")
                return
        limit = settings.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, APIError(413, f"the body is over {limit} bytes"), None)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(413, f"the body is over {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send: Send, error: APIError, code: str | None) -> None:
    import json

    if code is not None:
        error.code = code
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
