"""The FastAPI application: lifespan (engine start/stop, adapter watcher), small routes
(/health, /metrics, /v1/models, /version) and the wiring of the other modules."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from drlora_serve.types import EngineClient, EngineUnavailableError
from server import adapters, chat, completions, tokenize
from server.watcher import AdapterWatcher
from server.auth import ApiKeyMiddleware
from server.errors import install_handlers, model_not_found
from server.limits import BodyLimitMiddleware
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import ErrorResponse, ModelCard, ModelList
from server.state import Lifecycle, ServerConfig, ServerState, get_state

log = logging.getLogger("drlora.server")
EngineFactory = Callable[[], EngineClient | Awaitable[EngineClient]]


def build_app(engine_factory: EngineFactory, config: ServerConfig, lifecycle: Lifecycle | None = None) -> FastAPI:
    """`engine_factory` builds the engine inside the lifespan, in the server's event loop. With
    a `lifecycle` (the CLI's) the engine starts in the background, after uvicorn has opened the
    port, and the app watches for the core's death and the shutdown deadline (Lifecycle)."""
    holder: dict[str, ServerState] = {}

    def current_engine() -> EngineClient | None:
        st = holder.get("state")
        return st.engine if st is not None and st.ready else None

    metrics = ServerMetrics(current_engine)

    async def start_engine(app: FastAPI) -> None:
        engine = engine_factory()
        if inspect.isawaitable(engine):
            engine = await engine
        holder["engine"] = engine
        await engine.start()
        metrics.model_name = engine.model_name
        engine.token_timing = metrics.observe_tokens
        state = ServerState(engine=engine, config=config, metrics=metrics)
        holder["state"] = app.state.drlora = state
        if config.adapters_dir:
            state.watcher = AdapterWatcher(engine, config.adapters_dir, config.watch_interval, reserved=state.is_base)
            await state.watcher.start()
        state.ready = True
        log.info("serving %s (%d adapters) on http://%s:%d", engine.model_name,
                 len(engine.list_adapters()), config.host, config.port)

    async def start_in_background(app: FastAPI, lc: Lifecycle) -> None:
        try:
            await start_engine(app)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line, then the server stops with status 1
            log.error("the engine failed to start: %s", exc)
            log.debug("the engine failed to start", exc_info=exc)
            lc.exit(1)

    async def watch(lc: Lifecycle) -> None:
        """The core's death stops the server (as vLLM's does: a supervisor restarts it); at the
        shutdown deadline, requests still running fail with an error body."""
        while not lc.stopping():
            st = holder.get("state")
            if st is not None and getattr(st.engine, "dead", False):
                log.error("the engine core is dead; stopping the server")
                lc.exit(1)
                return
            await asyncio.sleep(0.2)
        await asyncio.sleep(config.shutdown_timeout)
        st = holder.get("state")
        if st is not None and hasattr(st.engine, "fail_all"):
            log.warning("requests still running after %.0fs: failing them", config.shutdown_timeout)
            st.engine.fail_all(EngineUnavailableError("the server is shutting down"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks: list[asyncio.Task] = []
        if lifecycle is None:
            await start_engine(app)
        else:
            tasks = [asyncio.create_task(start_in_background(app, lifecycle)),
                     asyncio.create_task(watch(lifecycle))]
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited (up to --shutdown-timeout, then the
            # watch above failed what was left) for open requests
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            state = holder.get("state")
            if state is not None:
                state.ready = False
                if state.watcher is not None:
                    await state.watcher.stop()
            engine = holder.get("engine")
            if engine is not None:  # (also one whose start was cut short)
                try:
                    await asyncio.wait_for(engine.shutdown(graceful=True), config.shutdown_timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    log.warning("engine did not drain in %.0fs; aborting", config.shutdown_timeout)
                    await engine.shutdown(graceful=False)

    app = FastAPI(title="drlora", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible server for per-expert-rank MoE LoRA adapters")
    install_handlers(app)
    keys = [config.api_key] if config.api_key else []
    if keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=keys)
    # CORS as vLLM sets it up (its flags and defaults), inside the body limit: preflights are
    # answered before the API key is asked for, as browsers send none with them
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)  # outermost: before any read

    @app.get("/health")
    async def health(request: Request) -> Response:
        st = getattr(request.app.state, "drlora", None)
        alive = st is not None and st.ready and not getattr(st.engine, "dead", False)
        return Response(status_code=200 if alive else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping(request: Request) -> Response:  # vLLM's (SageMaker's) liveness route: /health's answer
        return await health(request)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": _model_cards(get_state(request))})

    # `:path`: served names may hold slashes (hub ids such as allenai/OLMoE-1B-7B-0125)
    @app.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}})
    async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
        state = get_state(request)
        cards = _model_cards(state)
        if model_id and state.is_base(model_id):
            return JSONResponse(cards[0])
        card = next((c for c in cards[1:] if c["id"] == model_id), None)
        if card is None:
            raise model_not_found(model_id)
        return JSONResponse(card)

    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(adapters.router)
    app.include_router(tokenize.router)
    _document_errors(app)
    return app


def _model_cards(state: ServerState) -> list[dict]:
    """The base model's card first, then one per adapter (sorted by name)."""
    base, now, length = state.base_name, int(time.time()), state.engine.max_model_len
    cards = [{"id": base, "object": "model", "created": now, "owned_by": "drlora",
              "root": state.config.model_path or base, "parent": None, "max_model_len": length}]
    for a in sorted(state.engine.list_adapters(), key=lambda a: a.name):
        cards.append({"id": a.name, "object": "model", "created": now, "owned_by": "drlora",
                      "root": a.path, "parent": base, "max_model_len": length})
    return cards


def _document_errors(app: FastAPI) -> None:
    """The schema should say what the server does: validation errors are 400 with the
    OpenAI error body (FastAPI would advertise 422)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(error.pop("$defs", {}))
        schemas["ErrorResponse"] = error
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path in schema.get("paths", {}).values():
            for op in path.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {"description": "Bad request", **ref}
                if path is not schema["paths"].get("/health"):
                    responses.setdefault("default", {"description": "Error", **ref})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("drlora")
    except Exception:  # noqa: BLE001
        return "0+unknown"
