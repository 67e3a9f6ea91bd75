"""Server-wide configuration and the state shared by the route handlers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from drlora_serve.structured import GrammarValidator
from server.errors import APIError, model_not_found

if TYPE_CHECKING:
    from drlora_serve.types import EngineClient
    from server.watcher import AdapterWatcher
    from server.metrics import ServerMetrics


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    base_aliases: list[str] = field(default_factory=list)  # --model literal, resolved path
    model_path: str | None = None  # resolved base model folder (the base's `root`)
    adapters_dir: str | None = None  # watched folder
    watch_interval: float = 2.0
    lora_roots: list[str] = field(default_factory=list)  # allowed roots for load_lora_adapter
    allow_runtime_lora_updating: bool = True
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    max_prompts_per_request: int = 2048  # prompts x n of one request (engine requests it makes)
    max_request_bytes: int = 64 * 2**20  # --max-request-mb: larger bodies get a 413 (0: no limit)
    # --structured-outputs-config: defaults of StructuredOutputsParams (disable_any_whitespace, ...)
    structured_defaults: dict = field(default_factory=dict)
    trust_request_chat_template: bool = False  # a request's chat_template is rendered (vLLM's flag)
    chat_template: str | None = None  # --chat-template (else the tokenizer's)
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens (vLLM's flag)
    # CORS (vLLM's flags and defaults)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    def allowed_roots(self) -> list[str]:
        return [os.path.realpath(r) for r in self.lora_roots]


@dataclass
class Lifecycle:
    """What the CLI's uvicorn server lends the app (an app built without one, in tests, starts
    its engine inside the lifespan and never asks to exit): the engine then starts in the
    background, with the port already open (/health answers 503 until it is ready); a failed
    start or the engine core's death stop the server with status 1; and requests still running
    at --shutdown-timeout fail with an error body (a 503, or a stream's error event) before
    uvicorn would cut them."""

    exit: Callable[[int], None]  # ask the server to stop, then exit with this status
    stopping: Callable[[], bool]  # the server has begun to shut down (a signal, or exit())


@dataclass
class ServerState:
    engine: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    watcher: AdapterWatcher | None = None
    ready: bool = False
    grammars: GrammarValidator = field(default_factory=GrammarValidator)  # structured outputs, checked at request time
    _token_text: dict[int, str] = field(default_factory=dict)
    _max_token_chars: int = 0

    @property
    def base_name(self) -> str:
        return self.engine.model_name

    def is_base(self, name: str | None) -> bool:
        return name is None or name == "" or name == self.base_name or name in self.config.base_aliases

    @property
    def max_prompt_chars(self) -> int:
        """Text longer than this cannot fit the context whatever it says, so it is refused
        without tokenizing it (a 10 MB prompt would take the tokenizer many seconds). Each token
        covers at most `max_token_chars` characters of its text, so a text of c characters has
        at least c / max_token_chars tokens; a factor 4 covers what normalizers may merge."""
        if not self._max_token_chars:
            vocab = self.engine.tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return 4 * self.engine.max_model_len * self._max_token_chars

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (cached: logprobs ask for it per token)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id])
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def adapter_for(self, name: str | None) -> str | None:
        """The engine adapter a request's `model` field names (None: the base model)."""
        if self.is_base(name):
            return None
        if any(a.name == name for a in self.engine.list_adapters()):
            return name
        raise model_not_found(str(name))


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "drlora", None)
    if state is None or not state.ready:
        raise APIError(503, "The server is starting up or shutting down")
    return state
