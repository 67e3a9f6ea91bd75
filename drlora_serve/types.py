"""Request-level types shared by the engine and the HTTP server."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class InvalidRequestError(ValueError):
    """A request the engine refuses (bad sampling values, prompt too long, ...): HTTP 400."""


class AdapterNotFoundError(KeyError):
    """A request names an adapter that is not registered: HTTP 404."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "adapter not found"


OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (0: the chosen one only)
    prompt_logprobs: int | None = None  # same for prompt tokens (for echo)
    n: int = 1
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    # what each RequestOutput holds: "cumulative" (a full snapshot), "delta" (new since the
    # previous one) or "final" (one output at the end); vLLM's RequestOutputKind
    output_kind: str = "cumulative"

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be a non-negative integer, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise InvalidRequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (0 <= v <= 20):
                raise InvalidRequestError(f"{name} must be between 0 and 20, got {v}")
        if self.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {self.n}")
        if self.output_kind not in OUTPUT_KINDS:
            raise InvalidRequestError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """One request's output: a snapshot, a delta or the final result, as its
    SamplingParams.output_kind asks (CompletionOutput.text / token_ids / logprobs likewise;
    a delta lists only the sequences with something new, and prompt_logprobs only once)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    adapter: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None


@dataclass
class AdapterInfo:
    name: str
    path: str
    version: int  # bumps on every in-place replace
    total_rank: int
    resident: bool  # in the GPU pool now
    pinned: bool = False
    # where its tensors are now: "gpu" (the device pool of max_loras slots, on whatever device
    # the engine runs), "cpu" (the host tier of max_cpu_loras), "disk" (read again when needed)
    tier: str = "disk"
    max_rank: int = 0  # largest rank of any expert (or attention) projection


# Adapter load stages timed by the engine: reading from disk into host memory (validation
# included), and placing host tensors into the device pool.
LOAD_STAGES = ("disk_to_cpu", "cpu_to_gpu")
LOAD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0)


@dataclass
class Histogram:
    """A histogram as plain data (stats snapshots travel between threads, later processes):
    counts[i] observations fell in (buckets[i-1], buckets[i]]; counts[-1] above the last."""

    buckets: tuple[float, ...] = LOAD_SECONDS_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LOAD_SECONDS_BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)


def _load_histograms() -> dict[str, Histogram]:
    return {stage: Histogram() for stage in LOAD_STAGES}


@dataclass
class EngineStats:
    """What /metrics exports (vLLM-compatible names are the server's business)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    requests_finished_total: int = 0
    adapter_load_seconds: dict[str, Histogram] = field(default_factory=_load_histograms)  # by stage


class EngineClient(Protocol):
    """What the HTTP server needs from the engine (drlora_serve.async_llm.AsyncLLM)."""

    model_name: str  # the base model's served name
    max_model_len: int
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    # set by the server: called with (times to first token, [(seconds per token, tokens)]) as
    # tokens arrive, for the latency histograms
    token_timing: Any

    async def start(self) -> None: ...
    async def shutdown(self, graceful: bool = True) -> None: ...

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """RequestOutputs of params.output_kind (cumulative snapshots, deltas, or the final
        result) until finished. Closing the iterator early aborts the request and frees its KV
        blocks. Raises AdapterNotFoundError / InvalidRequestError up front."""
        ...

    async def abort(self, request_id: str) -> None: ...
    def list_adapters(self) -> list[AdapterInfo]: ...

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        """NotAnAdapterError (404) if the path holds no adapter, AdapterFormatError or
        ValueError (duplicate name without replace) otherwise (400)."""
        ...

    async def unload_adapter(self, name: str) -> None: ...  # AdapterNotFoundError
    def stats(self) -> EngineStats: ...
