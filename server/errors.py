"""OpenAI-style error bodies and the exception handlers that produce them.

Every error the server returns is `{"error": {"message", "type", "param", "code"}}` with the
HTTP status in `code`, like vLLM's OpenAI server. Validation errors are 400 (not FastAPI's
422) so that clients written against OpenAI/vLLM see the status they expect.

Rendering an error can never fail (messages echo client strings, which may hold lone
surrogates: they are escaped), and no error closes the keep-alive connection: an unexpected
exception becomes a 500 body here instead of reaching Starlette's outermost handler, which
re-raises to the server after answering (uvicorn then drops the connection).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from drlora.adapter_format import AdapterFormatError, NotAnAdapterError
from drlora_serve.types import AdapterNotFoundError, EngineUnavailableError, InvalidRequestError

log = logging.getLogger("drlora.server")

TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised by handlers; rendered as an OpenAI-style error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or TYPES.get(status, "APIError")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "model")


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) escaped as \\udXXX."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": safe_text(str(message)),
                      "type": safe_text(type_ or TYPES.get(status, "APIError")),
                      "param": None if param is None else safe_text(str(param)),
                      "code": status}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.type),
                        status_code=exc.status)


def from_exception(exc: BaseException) -> APIError:
    """Map engine / adapter-format exceptions onto HTTP statuses (unknown ones: 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), "model")
    if isinstance(exc, NotAnAdapterError):
        return APIError(404, str(exc), "lora_path")
    if isinstance(exc, (InvalidRequestError, AdapterFormatError)):
        return APIError(400, str(exc), getattr(exc, "param", None))
    if isinstance(exc, EngineUnavailableError):  # shutting down, or the core died: retry elsewhere
        return APIError(503, str(exc))
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}")


def sse_error(exc: BaseException) -> str:
    """An error inside a stream that has already started (the status is already sent)."""
    e = from_exception(exc)
    return f"data: {json.dumps(error_body(e.status, e.message, e.param, e.type))}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "Invalid request", None
    first = errs[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('msg', '')}".strip(), None
    if not loc and str(first.get("type", "")).endswith("_type"):  # the body itself: not an object
        return "The request body must be a JSON object (content-type: application/json)", None
    where = ".".join(loc)
    kind = first.get("type")
    msg = first.get("msg", "invalid value")
    if kind in ("model_type", "model_attributes_type", "dict_type"):  # JSON words, no class names
        kind, msg = "accepts", "must be an object"
    elif kind == "value_error":  # a validator's own words, without pydantic's prefix
        msg = msg.removeprefix("Value error, ")
    more = f" (+{len(errs) - 1} more errors)" if len(errs) > 1 else ""
    # a request-level check names its field in ctx (see protocol.refuse_unsupported)
    param = (first.get("ctx") or {}).get("param") or (loc[0] if loc else None)
    if not where:
        return f"{msg}{more}", param
    # "prompt must be a string, ..." (protocol._by_shape); else "prompt.0: <what is wrong>"
    return f"{where} {msg}{more}" if kind == "accepts" else f"{where}: {msg}{more}", param


class CatchAllMiddleware:
    """Unexpected exceptions become a 500 OpenAI body on a connection that stays open. Pure
    ASGI, inside Starlette's ServerErrorMiddleware; a response already started (a stream)
    cannot change its status, so then the exception goes on (the stream is cut)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_watch)
        except Exception as exc:  # noqa: BLE001 - rendered, never re-raised to the server
            if started:
                raise
            response = error_response(from_exception(exc))
            await response(scope, receive, send)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(error_body(exc.status_code, detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(InvalidRequestError)
    @app.exception_handler(EngineUnavailableError)
    @app.exception_handler(AdapterNotFoundError)
    @app.exception_handler(AdapterFormatError)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc))

    app.add_middleware(CatchAllMiddleware)  # instead of a handler for Exception (see above)
