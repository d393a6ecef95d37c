"""`build_app(engine, config)`: the FastAPI app of the OpenAI-compatible API over an AsyncLLMEngine.

Routes: /v1/completions, /v1/chat/completions (JSON or SSE), /v1/models, /v1/tokenize,
/v1/detokenize, /health, /version; /docs and /openapi.json come from FastAPI. serving/middleware.py adds
the Kobold API, /metrics, /v1/admin/status, the playground at / and keys/CORS/middleware. Starting
uvicorn is the CLI's job (serving/cli.py `run_server`).
"""
from __future__ import annotations

import logging
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import aphrodite_jax
from serving.config import ServingConfig
from serving.middleware import install_surface, instrument
from serving.openai.errors import APIError, BodyLimitMiddleware, install_error_handlers
from serving.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                     CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                     ModelCard, ModelList, TokenizeChatRequest, TokenizeCompletionRequest,
                                     TokenizeResponse)
from serving.openai.serving_chat import OpenAIServingChat
from serving.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger(__name__)

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _log_request(config: ServingConfig, kind: str, req: Any) -> None:
    if config.disable_log_requests or not logger.isEnabledFor(logging.INFO):
        return
    prompt = getattr(req, "prompt", None) if kind == "completion" else [m.role for m in req.messages]
    text = repr(prompt)
    if config.max_log_len:
        text = text[:config.max_log_len]
    logger.info("%s request: model=%s stream=%s n=%s prompt=%s", kind, req.model, req.stream, req.n, text)


def build_app(engine: Any, config: ServingConfig) -> FastAPI:
    """The OpenAI-side app. `engine` is an AsyncLLMEngine (or anything with its interface)."""
    engine = instrument(engine, config)  # /metrics counts what this app's routes ask of the engine
    app = FastAPI(title="aphrodite-jax OpenAI-compatible API", version=aphrodite_jax.__version__)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_request_body_bytes)
    completion = OpenAIServingCompletion(engine, config)
    chat = OpenAIServingChat(engine, config)
    app.state.engine = engine
    app.state.serving_config = config
    app.state.served_model_names = completion.names

    def _respond(result: Any) -> Response:
        if result is None:  # the client disconnected before the answer was ready
            return Response(status_code=499)
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)
        return JSONResponse(result.model_dump(mode="json"))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def create_completion(body: CompletionRequest, request: Request):
        _log_request(config, "completion", body)
        return _respond(await completion.create(body, request))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        _log_request(config, "chat", body)
        return _respond(await chat.create(body, request))

    @app.get("/v1/models", response_model=ModelList)
    async def show_models():
        root = engine.model_name or completion.model_name
        cards = [ModelCard(id=name, root=root, max_model_len=completion.max_model_len)
                 for name in completion.names]
        return ModelList(data=cards)

    @app.post("/v1/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: Union[TokenizeChatRequest, TokenizeCompletionRequest]):
        completion.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            _, ids = chat.render_prompt(body)
        else:
            ids = list(engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=completion.max_model_len)

    @app.post("/v1/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest):
        completion.check_model(body.model)
        vocab = engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"tokens: id {bad[0]} is outside the vocabulary (size {vocab})", 400, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @app.get("/health")
    async def health():
        if not engine.is_running or getattr(app.state, "draining", False):
            why = "the server is shutting down" if engine.is_running else "the engine is not running"
            return JSONResponse({"error": {"message": why, "type":
                                           "ServiceUnavailableError", "param": None, "code": 503}},
                                status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": aphrodite_jax.__version__}

    install_surface(app, engine, config)  # Kobold, /metrics, admin, playground, keys, CORS, middleware
    return app
