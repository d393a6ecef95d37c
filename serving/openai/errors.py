"""Every client-caused failure as OpenAI's `{"error": {message, type, param, code}}` with a 4xx status.

`install_error_handlers(app)` replaces FastAPI's 422 validation handler and the HTTPException handler,
and turns any ValueError that escapes a route into a 400 (never a 500 for client input).
`BodyLimitMiddleware` answers 413 for bodies over the limit before anything parses them.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
          422: "UnprocessableEntityError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """Raised inside routes; rendered by the handler in OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type = type or _TYPES.get(status, "BadRequestError")
        self.headers = headers


def error_body(message: str, status: int = 400, param: Optional[str] = None,
               type: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


def error_response(message: str, status: int = 400, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


_FIELD_RE = re.compile(r"^([a-z_][a-z0-9_]*)\b")


def param_of(message: str, candidates: Optional[set[str]] = None) -> Optional[str]:
    """The request field a SamplingParams / engine message is about (its first word, e.g. 'top_p')."""
    m = _FIELD_RE.match(message.lstrip("`"))
    name = m.group(1) if m else None
    if name and (candidates is None or name in candidates):
        return name
    for cand in sorted(candidates or (), key=len, reverse=True):
        if re.search(rf"\b{re.escape(cand)}\b", message):
            return cand
    if "priority list" in message:
        return "sampler_priority"
    if "logprobs" in message:
        return "logprobs"
    if "context length" in message:
        return "messages" if "messages" in message else "prompt"
    return None


def value_error(exc: ValueError, candidates: Optional[set[str]] = None) -> APIError:
    msg = str(exc)
    return APIError(msg, 400, param_of(msg, candidates))


def _describe_validation(errors: list[dict]) -> tuple[str, Optional[str]]:
    """One readable message and the offending field from pydantic's error list."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Union members add their type name to the location; keep only real field names / indices.
        loc = [x for x in loc if not re.match(r"^(str|int|list|dict|float|bool|function-|tagged|union)", x)
               or x.isdigit()]
        field = ".".join(loc)
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            text = f"Unknown field `{field}`: this server does not accept it"
        elif kind == "json_invalid":
            text = f"Malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
            field = field if field and not field.isdigit() else None
        elif kind == "missing":
            text = f"Field `{field}` is required"
        else:
            text = f"{field}: {err.get('msg')}" if field else str(err.get("msg"))
        parts.append(text)
        if param is None and field:
            param = loc[0] if loc and not loc[0].isdigit() else field
    message = "; ".join(dict.fromkeys(parts)) or "Invalid request"
    return message, param


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    # A wrong value for a union/literal produces one error per member; the first is enough per field.
    seen, unique = set(), []
    for e in errors:
        key = tuple(str(x) for x in e.get("loc", ())[:2])
        if key not in seen:
            seen.add(key)
            unique.append(e)
    message, param = _describe_validation(unique)
    if any(e.get("type") == "json_invalid" for e in errors):
        param = None
    return error_response(message, 400, param)


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if status == 400 and "parsing the body" in detail:
        detail = "Malformed request body: it must be UTF-8 encoded JSON"
    return JSONResponse(error_body(detail, status), status_code=status, headers=getattr(exc, "headers", None))


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.status, exc.param, exc.type), status_code=exc.status,
                        headers=exc.headers)


async def _value_error_handler(request: Request, exc: ValueError) -> JSONResponse:
    return error_response(str(exc), 400, param_of(str(exc)))


RETRY_AFTER_S = 5  # what an overloaded or draining server asks clients to wait


def engine_error(exc: BaseException) -> Optional[APIError]:
    """The HTTP error for an engine failure: 503 + Retry-After when it is overloaded, dead or shutting
    down (another replica, or this one after its restart, can serve it), 500 when the step running the
    request failed. None for anything else."""
    from aphrodite_jax.engine.async_engine import EngineDeadError, EngineStepError, QueueFullError

    if isinstance(exc, (QueueFullError, EngineDeadError)):
        return APIError(str(exc), 503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineStepError):
        return APIError(str(exc), 500)
    return None


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    api = engine_error(exc)
    if api is not None:
        return await _api_error_handler(request, api)
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(f"Internal error: {type(exc).__name__}", 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(ValueError, _value_error_handler)
    app.add_exception_handler(Exception, _unhandled)


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a request body over `limit` bytes (declared or actually sent)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)
        # No length given (chunked): read the body here, bounded, then replay it.
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._reject(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        resp = error_response(f"Request body too large: the limit is {self.limit} bytes", 413)
        await resp(scope, receive, send)
