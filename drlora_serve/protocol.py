"""Messages between the frontend (the API server process, or the offline LLM) and the engine
core, and their msgpack encoding (msgspec) for the ZMQ sockets between the two processes.

frontend -> core: AddRequest, Abort, FinishSeqs, UtilityCall, Shutdown
core -> frontend: Ready (once, after the model is loaded), StepOutputs (per step, deltas only:
the new token of every sequence that got one, its logprobs, the sequences that finished),
UtilityResult (answer to a UtilityCall), CoreFailed.

Sequences are named by integer keys the frontend assigns: request key k owns sequences
k .. k + n - 1. Per-step outputs never repeat what was sent before.
"""

from __future__ import annotations

from typing import Any

import msgspec

from drlora_serve.types import (
    AdapterInfo,
    AdapterNotFoundError,
    EngineStats,
    InvalidRequestError,
    SamplingParams,
)


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    key: int  # sequences key .. key + n - 1
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    arrival: float = 0.0


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class FinishSeqs(msgspec.Struct, tag=True, array_like=True):
    """Sequences the frontend finished (a stop string): free them, send nothing more."""

    seq_keys: list[int]
    reason: str = "stop"


class UtilityCall(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    method: str  # an EngineCore method in core_proc.UTILITY_METHODS
    args: list[Any] = []


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


CoreInput = AddRequest | Abort | FinishSeqs | UtilityCall | Shutdown


class EngineInfo(msgspec.Struct, array_like=True):
    """What the frontend needs to validate requests without asking the core."""

    model_name: str
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    adapters: list[AdapterInfo]


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: EngineInfo


# logprobs of one token: (chosen token's logprob, its rank, top ids, top logprobs)
RowLogprobs = tuple[float, int, list[int], list[float]]


class PromptLogprobs(msgspec.Struct, array_like=True):
    seq_key: int
    first: int  # prompt position of the first entry
    logprobs: list[float]  # of the prompt tokens first, first + 1, ...
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    ranks: list[int] | None = None  # of the prompt tokens (vLLM's rank: 1 = the most likely)


class RequestFailed(msgspec.Struct, array_like=True):
    request_key: int
    error_type: str  # an exception class name (see error_from)
    message: str


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    seq_keys: list[int] = []  # sequences that got a token this step
    token_ids: list[int] = []  # their new token, aligned with seq_keys
    logprobs: list[RowLogprobs | None] | None = None  # aligned with seq_keys when any row asked
    prompt_logprobs: list[PromptLogprobs] = []
    finished: list[tuple[int, str]] = []  # (seq key, finish reason)
    failed: list[RequestFailed] = []
    stats: EngineStats | None = None
    adapters: list[AdapterInfo] | None = None  # the adapter list, when it changed
    # (request key, prompt tokens from the prefix cache): once a request, in the step that
    # brings its first sequence's first token (or ends a request that samples nothing)
    cached: list[tuple[int, int]] = []

    @property
    def empty(self) -> bool:
        return not (self.seq_keys or self.prompt_logprobs or self.finished or self.failed) \
            and self.stats is None and self.adapters is None


class UtilityResult(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    value: Any = None
    error_type: str | None = None
    message: str = ""


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The core could not start (or died): the reason, for the frontend's error."""

    message: str


CoreOutput = Ready | StepOutputs | UtilityResult | CoreFailed

# ------------------------------------------------------------------ errors across the boundary


def error_from(error_type: str, message: str) -> Exception:
    """Rebuild an engine exception sent as (class name, message)."""
    from drlora.adapter_format import AdapterFormatError, NotAnAdapterError

    known = {c.__name__: c for c in (AdapterNotFoundError, InvalidRequestError, AdapterFormatError,
                                     NotAnAdapterError, ValueError, KeyError)}
    cls = known.get(error_type)
    if cls is None:
        return RuntimeError(f"engine error ({error_type}): {message}")
    return cls(message)


def error_fields(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


# ------------------------------------------------------------------ encoding

def input_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreInput)


def output_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreOutput)
