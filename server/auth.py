"""Bearer-token check for the API routes (`/v1/*`), as in vLLM: /health, /metrics and the
OpenAPI schema stay open so that probes and scrapers need no secret."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body

PROTECTED_PREFIX = "/v1"


class ApiKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() == b"bearer" and token:
                    # compare against every key in constant time
                    return any(hmac.compare_digest(token, k) for k in self.keys)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.keys or scope.get("method") == "OPTIONS"
                or not scope.get("path", "").startswith(PROTECTED_PREFIX)
                or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(401, "Incorrect or missing API key: send "
                                          "'Authorization: Bearer <key>'.",
                                     type_="AuthenticationError")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
