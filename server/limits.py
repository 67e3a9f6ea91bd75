"""Request body size limit (`--max-request-mb`): a body larger than the limit gets a 413 with an
OpenAI-style error body before it is parsed: at once from its Content-Length, or, for a chunked
body, as soon as the bytes read pass the limit. The rest of the body is never read into
memory; the connection is closed after the 413. Other requests are not affected."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body


class _TooLarge(HTTPException):
    """Raised while a chunked body is read: FastAPI lets an HTTPException out of its body
    parsing (any other exception there becomes a 400), and the handlers render it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _message(max_bytes))


def _message(max_bytes: int) -> str:
    return f"The request body is larger than this server's limit of {max_bytes / 2**20:g} MiB (--max-request-mb)"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers") or () if k == b"content-length"), None)
        if length is not None:  # (the server holds a body to its Content-Length: nothing to count)
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)  # (send untouched: streamed chunks pay nothing)
            return
        seen = 0

        async def limited() -> Message:  # a chunked body: counted as it is read
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:  # (an app that reads the body outside FastAPI's parsing)
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(error_body(413, _message(self.max_bytes)), status_code=413,
                                headers={"connection": "close"})  # (the rest of the body is never read)
        await response(scope, receive, send)
