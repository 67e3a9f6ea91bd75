"""Request-level types shared by the engine and the HTTP server."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """A request the engine refuses (bad sampling values, prompt too long, ...): HTTP 400.
    `param`: the request field at fault, when one is (the error body's `param`)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineUnavailableError(RuntimeError):
    """The engine takes no requests: it is shutting down, or its core process is gone (HTTP 503)."""


class EngineDeadError(EngineUnavailableError):
    """The engine core process is gone."""


class AdapterNotFoundError(KeyError):
    """A request names an adapter that is not registered: HTTP 404."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "adapter not found"


OUTPUT_KINDS = ("cumulative", "delta", "final")
# the smallest temperature that samples: a smaller positive one overflows logits / T to inf
# (NaN probabilities, arbitrary tokens), so it is raised to this, as vLLM does
MIN_TEMPERATURE = 1e-2


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's StructuredOutputsParams): exactly one of
    `json` (a JSON schema, as a dict or its text), `regex`, `choice` (one of these strings),
    `grammar` (Lark or GBNF) or `json_object` (any JSON object). `disable_any_whitespace`:
    JSON without free whitespace between tokens (compact); `disable_additional_properties`:
    `additionalProperties: false` on every object of the schema that does not say; vLLM's names."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False  # objects of the schema accept no other keys

    def kind(self) -> str:
        """Which constraint is set ("json", "regex", ...); InvalidRequestError unless exactly one."""
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise InvalidRequestError("structured outputs need exactly one of json, regex, choice, grammar or "
                                      f"json_object (got {', '.join(kinds) or 'none'})")
        return kinds[0]


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length (resolved by the frontend, as vLLM)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off (vLLM)
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
    # ---- logits controls (vLLM's names and semantics; applied batched on the device)
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # tokens of prompt or output: positive logits / p, negative * p
    min_p: float = 0.0  # drop tokens below min_p x the top probability (after temperature)
    min_tokens: int = 0  # no eos (even with ignore_eos) / stop token (nor stop string) before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (before all else)
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # words never generated (tokenized by the frontend)
    # ---- text
    detokenize: bool = True  # False: token ids only (text "", no decoded_token in logprobs; no stop strings)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: the context length)
    structured_outputs: StructuredOutputsParams | None = None
    # set by the frontend from bad_words (it has the tokenizer; vLLM's _bad_words_token_ids)
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        # vLLM's normalization: one string is one stop string (not its characters), None is none
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        # bad values fail here, as in vLLM (max_tokens=None is resolved later, by the frontend)
        self.validate(resolved=False)

    def validate(self, resolved: bool = True) -> None:
        """InvalidRequestError (a ValueError) naming the first bad field. resolved: max_tokens
        must be a number by now (None, "up to the context length", has been resolved)."""
        unbounded = self.max_tokens is None and not resolved
        if not unbounded and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise InvalidRequestError(f"max_tokens must be a non-negative integer, got {self.max_tokens}", "max_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if 0 < self.temperature < MIN_TEMPERATURE:
            log.warning("temperature %g is below %g, which overflows the logits; raised to %g (as vLLM does)",
                        self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}", "top_k")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (0 <= v <= 20):
                raise InvalidRequestError(f"{name} must be between 0 and 20, got {v}", name)
        if self.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {self.n}", "n")
        if self.output_kind not in OUTPUT_KINDS:
            raise InvalidRequestError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}",
                                      "output_kind")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v}", name)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                      "repetition_penalty")
        if not (0 <= self.min_p <= 1):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be a non-negative integer, got {self.min_tokens}", "min_tokens")
        if not unbounded and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                                      "min_tokens")
        if self.logit_bias and any(not math.isfinite(v) for v in self.logit_bias.values()):
            raise InvalidRequestError("logit_bias values must be finite numbers", "logit_bias")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequestError("allowed_token_ids must not be empty", "allowed_token_ids")
        if self.stop and not self.detokenize:
            raise InvalidRequestError("stop strings need detokenize=True (give stop_token_ids instead)", "stop")
        t = self.truncate_prompt_tokens
        if t is not None and not (t == -1 or t >= 1):
            raise InvalidRequestError(f"truncate_prompt_tokens must be -1 or >= 1, got {t}", "truncate_prompt_tokens")
        if self.structured_outputs is not None:
            self.structured_outputs.kind()

    def check_vocab(self, vocab: int) -> None:
        """Token ids the request names must exist (InvalidRequestError)."""
        for name, ids in (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("bad_words", [t for w in self.bad_words_token_ids or () for t in w]),
                          ("stop_token_ids", self.stop_token_ids)):
            bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
            if bad is not None:
                raise InvalidRequestError(f"{name}: token id {bad} is out of vocabulary (size {vocab})", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class Logprob:
    """One token's entry in a logprobs dict (vLLM's Logprob): its logprob, its rank in the
    vocabulary (1: the most likely; None when the engine did not report it) and its text on
    its own (`tokenizer.decode([token_id])`)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class TokenLogprob(Mapping):
    """The logprobs of one position. Read as vLLM's dict[token id, Logprob]: the token itself
    (sampled, or the prompt's) first, then the top k not already listed, so k or k + 1
    entries; the top k have ranks 1..k, the token its own rank (when it is outside the top k:
    the rank the engine reports, tokens at least as likely).
    `token_id`, `logprob`, `top` (the top k as token id -> logprob, most likely first) and
    `rank` are the same data as plain attributes."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, most likely first
    rank: int | None = None  # tokens at least as likely, itself included (vLLM's rank)
    # token id -> its text (decoded lazily; a dict once pickled or copied)
    decoder: Callable[[int], str] | dict[int, str] | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, token_id: int) -> Logprob:
        if token_id in self.top:
            lp, rank = self.top[token_id], list(self.top).index(token_id) + 1
        elif token_id == self.token_id:
            lp, rank = self.logprob, self.rank
        else:
            raise KeyError(token_id)
        dec = self.decoder
        text = dec.get(token_id) if isinstance(dec, dict) else dec(token_id) if dec is not None else None
        return Logprob(lp, rank, text)

    def __iter__(self) -> Iterator[int]:
        yield self.token_id
        for t in self.top:
            if t != self.token_id:
                yield t

    def __len__(self) -> int:
        return len(self.top) + (self.token_id not in self.top)

    def __contains__(self, token_id: object) -> bool:
        return token_id == self.token_id or token_id in self.top

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if callable(self.decoder):  # (the tokenizer behind it stays here)
            state["decoder"] = {t: self.decoder(t) for t in self}
        return state


@dataclass(eq=False)
class LoRARequest:
    """Which adapter a request runs with (vLLM's LoRARequest). The name identifies the adapter
    here: a registered name is used as it is (lora_path may be left empty; if given it must be
    the folder the adapter was loaded from), an unknown one is loaded from lora_path on first
    use. load_inplace=True loads lora_path again under the name (replacing what it holds).
    lora_int_id must be >= 1, as in vLLM; it does not identify the adapter here."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None  # accepted for vLLM compatibility (unused)
    load_inplace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        self.lora_path = str(self.lora_path or "")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    def __eq__(self, other: object) -> bool:  # vLLM: one adapter per name
        return isinstance(other, LoRARequest) and other.lora_name == self.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    # per token (when SamplingParams.logprobs is set): vLLM's dict[token id, Logprob], see TokenLogprob
    logprobs: list[TokenLogprob] | None = None
    # what made it "stop": the stop string, or the stop_token_ids entry; None for eos and the
    # other reasons (vLLM's stop_reason)
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None  # sum of the tokens' logprobs (when logprobs are asked, as vLLM)
    lora_request: LoRARequest | None = None  # the offline LLM's, when the request gave one

    def finished(self) -> bool:
        return self.finish_reason is not None


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
    # why the request failed while it ran (LLMEngine.step; its sequences end with "abort"),
    # None if it did not; AsyncLLM raises it instead
    error: BaseException | None = None
    prompt: str | None = None  # the prompt's text, when the offline LLM was given text (or rendered a chat)
    lora_request: LoRARequest | None = None  # the offline LLM's, when the request gave one
    # vLLM's: prompt tokens whose KV came from the prefix cache when the request's first sequence
    # was first scheduled (a multiple of the block size; 0 without hits); None until its first token
    num_cached_tokens: int | None = None


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
    # CUDA graphs (drlora_serve.cuda_graphs.GraphStats): decode-only steps replayed vs run eagerly
    cuda_graphs_enabled: bool = False  # false on CPU, with enforce_eager, or after a capture failure
    cuda_graph_replays_total: int = 0
    eager_decode_steps_total: int = 0
    cuda_graphs_captured: int = 0
    cuda_graph_lazy_captures_total: int = 0  # captured while serving (no start-up graph covered)
    cuda_graph_capture_failures_total: int = 0
    cuda_graph_error: str | None = None  # the last capture failure


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
    def fail_all(self, exc: Exception) -> None:
        """Fail every request in flight with exc (the server's shutdown deadline)."""
        ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        """NotAnAdapterError (404) if the path holds no adapter, AdapterFormatError or
        ValueError (duplicate name without replace) otherwise (400)."""
        ...

    async def unload_adapter(self, name: str) -> None: ...  # AdapterNotFoundError
    def stats(self) -> EngineStats: ...
