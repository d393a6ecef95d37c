"""API keys and the admin key (docs/decisions.md D1, D19), as pure ASGI middleware.

Rules:
- `/v1/...` and `/api/...` need a key whenever any key (API or admin) is configured; the admin key
  is accepted wherever an API key is.
- Admin routes (`/v1/admin`, `/v1/lora`, `/v1/soft_prompt`, `/v1/model/...`, but not `/v1/models`)
  always need the admin key; with no admin key configured they answer 403.
- Everything else (`/`, `/health`, `/metrics`, `/version`, `/docs`, static files) is public, and
  `OPTIONS` always passes so CORS preflights work.
Keys come as `Authorization: Bearer KEY` or `x-api-key: KEY` and are compared in constant time.
Failures are OpenAI-shaped 401s, so the openai client raises AuthenticationError.
"""
from __future__ import annotations

import hmac
from typing import Iterable, Optional

from serving.openai.errors import error_response

_ADMIN_PREFIXES = ("/v1/admin", "/v1/lora", "/v1/soft_prompt", "/v1/model/")
_PROTECTED_PREFIXES = ("/v1", "/api")


def is_admin_path(path: str) -> bool:
    return path == "/v1/model" or path.startswith(_ADMIN_PREFIXES)


def is_protected_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _PROTECTED_PREFIXES)


def _matches(given: Optional[str], keys: Iterable[str]) -> bool:
    """Constant-time against every configured key (no early exit that would leak which one)."""
    if given is None:
        return False
    probe = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(probe, key.encode())
    return ok


def presented_key(headers: dict[bytes, bytes]) -> Optional[str]:
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() if key is not None else None


class AuthMiddleware:
    def __init__(self, app, api_keys: list[str], admin_key: Optional[str]):
        self.app = app
        self.api_keys = list(api_keys)
        self.admin_key = admin_key
        self.any_key = bool(self.api_keys or admin_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        denial = self.check(path, presented_key(dict(scope.get("headers") or [])))
        if denial is None:
            return await self.app(scope, receive, send)
        status, message = denial
        resp = error_response(message, status)
        if status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        await resp(scope, receive, send)

    def check(self, path: str, key: Optional[str]) -> Optional[tuple[int, str]]:
        """None when the request may pass, else (status, message)."""
        if is_admin_path(path):
            if self.admin_key is None:
                return 403, ("Admin operations are disabled: start the server with --admin-key or "
                             "APHRODITE_ADMIN_KEY to use this route")
            if not _matches(key, [self.admin_key]):
                return 401, ("Unauthorized: this admin route needs the admin key (as `Authorization: "
                             "Bearer KEY` or `x-api-key: KEY`)")
            return None
        if self.any_key and is_protected_path(path):
            keys = self.api_keys + ([self.admin_key] if self.admin_key else [])
            if not _matches(key, keys):
                return 401, ("Unauthorized: missing or invalid API key (send it as `Authorization: "
                             "Bearer KEY` or `x-api-key: KEY`)")
        return None
