"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests ignore unknown fields that change nothing (`user`, `store`, `metadata`, ...), but
every known OpenAI / vLLM option that would change the output and that the server does not
implement is refused with a 400 naming it, never silently dropped: the table UNSUPPORTED
below is the one place that says which (an entry goes once its option is implemented).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Bounds keep requests sane (and keep the schema fuzzer inside them); the engine checks again.
MAX_N = 16
MAX_LOGPROBS = 20
SEED_MAX = 2**63 - 1

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _encodable(value: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"); such a string is no text: it cannot be
    encoded as UTF-8 (tokenizers, logs and responses would fail on it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "unicode_surrogate", "must be valid Unicode text (it contains a lone surrogate, "
            "which cannot be encoded as UTF-8)") from None
    return value


# Every string a client sends goes through this type (prompts, messages, names, stop strings,
# paths, dict keys), so that nothing downstream ever sees a string it cannot encode.
Text = Annotated[str, AfterValidator(_encodable)]


# ---------------------------------------------------------------------- unsupported options
# No-op predicates take the raw JSON value (anything: they must not raise) and the whole body.


def _absent(v: Any, body: dict) -> bool:
    return v is None


def _empty(v: Any, body: dict) -> bool:
    return v is None or (isinstance(v, (str, list, dict)) and len(v) == 0)


def _false(v: Any, body: dict) -> bool:
    return v is None or v is False


def _true(v: Any, body: dict) -> bool:
    return v is None or v is True


def _number(value: float) -> Callable[[Any, dict], bool]:
    def noop(v: Any, body: dict) -> bool:
        return v is None or (type(v) in (int, float) and math.isfinite(v) and v == value)
    return noop


def _one_of(*values: str) -> Callable[[Any, dict], bool]:
    def noop(v: Any, body: dict) -> bool:
        return v is None or (isinstance(v, str) and v in values)
    return noop


def _text_format(v: Any, body: dict) -> bool:  # response_format {"type": "text"}: plain text
    return v is None or v == {"type": "text"}


def _text_modality(v: Any, body: dict) -> bool:
    return v is None or v == ["text"]


def _best_of(v: Any, body: dict) -> bool:  # best_of == n: n samples, all returned
    return v is None or (type(v) is int and v == body.get("n", 1))


def _top_logprobs(v: Any, body: dict) -> bool:  # chat: only meaningful with logprobs=true
    return v is None or v == 0 or body.get("logprobs") is True


@dataclass(frozen=True)
class Unsupported:
    field: str
    endpoints: tuple[str, ...]  # "completions", "chat"
    noop: Callable[[Any, dict], bool]  # True for values that change nothing (accepted)
    accepted: str  # what the message offers instead, e.g. "0 or omit it"
    message: str = ""  # replaces the standard message when set


BOTH = ("completions", "chat")
COMPLETIONS = ("completions",)
CHAT = ("chat",)

UNSUPPORTED: tuple[Unsupported, ...] = (
    # sampling (see the sampling issue: each entry goes once the engine implements it)
    Unsupported("presence_penalty", BOTH, _number(0), "0 or omit it"),
    Unsupported("frequency_penalty", BOTH, _number(0), "0 or omit it"),
    Unsupported("repetition_penalty", BOTH, _number(1), "1 or omit it"),
    Unsupported("min_p", BOTH, _number(0), "0 or omit it"),
    Unsupported("min_tokens", BOTH, _number(0), "0 or omit it"),
    Unsupported("logit_bias", BOTH, _empty, "omit it"),
    Unsupported("bad_words", BOTH, _empty, "omit it"),
    Unsupported("allowed_token_ids", BOTH, _empty, "omit it"),
    Unsupported("use_beam_search", BOTH, _false, "false or omit it"),
    Unsupported("length_penalty", BOTH, _number(1), "1 or omit it"),
    Unsupported("best_of", BOTH, _best_of, "n or omit it"),
    # structured output and tools
    Unsupported("response_format", BOTH, _text_format, '{"type": "text"} or omit it'),
    Unsupported("structured_outputs", BOTH, _empty, "omit it"),
    Unsupported("guided_json", BOTH, _absent, "omit it"),
    Unsupported("guided_regex", BOTH, _absent, "omit it"),
    Unsupported("guided_choice", BOTH, _absent, "omit it"),
    Unsupported("guided_grammar", BOTH, _absent, "omit it"),
    Unsupported("tools", CHAT, _empty, "omit it"),
    Unsupported("tool_choice", CHAT, _one_of("none", "auto"), '"none" or omit it'),
    Unsupported("functions", CHAT, _empty, "omit it"),
    Unsupported("function_call", CHAT, _one_of("none", "auto"), '"none" or omit it'),
    # text and prompt handling
    Unsupported("include_stop_str_in_output", BOTH, _false, "false or omit it"),
    Unsupported("skip_special_tokens", BOTH, _true, "true or omit it"),
    Unsupported("spaces_between_special_tokens", BOTH, _true, "true or omit it"),
    Unsupported("truncate_prompt_tokens", BOTH, _absent, "omit it"),
    Unsupported("add_special_tokens", COMPLETIONS, _true, "true or omit it"),
    Unsupported("add_special_tokens", CHAT, _false, "false or omit it"),
    Unsupported("suffix", COMPLETIONS, _empty, "omit it"),
    Unsupported("prompt_embeds", COMPLETIONS, _absent, "omit it"),
    Unsupported("echo", CHAT, _false, "false or omit it"),
    Unsupported("chat_template", CHAT, _absent, "omit it (the model's template is used)"),
    Unsupported("chat_template_kwargs", CHAT, _empty, "omit it"),
    Unsupported("documents", CHAT, _empty, "omit it"),
    Unsupported("continue_final_message", CHAT, _false, "false or omit it"),
    Unsupported("reasoning_effort", CHAT, _absent, "omit it"),
    Unsupported("modalities", CHAT, _text_modality, '["text"] or omit it'),
    Unsupported("audio", CHAT, _absent, "omit it"),
    Unsupported("web_search_options", CHAT, _absent, "omit it"),
    # extra outputs
    Unsupported("prompt_logprobs", BOTH, _absent, "omit it (completions: echo with logprobs scores the prompt)"),
    Unsupported("return_tokens_as_token_ids", BOTH, _false, "false or omit it"),
    Unsupported("return_token_ids", BOTH, _false, "false or omit it"),
    Unsupported("top_logprobs", CHAT, _top_logprobs, "",
                message="top_logprobs requires logprobs=true"),
)


def refuse_unsupported(body: dict, endpoint: str) -> None:
    """A 400 (through pydantic, with the field as `param`) for the first option of
    UNSUPPORTED that `body` sets to a value that would change the output."""
    for u in UNSUPPORTED:
        if endpoint in u.endpoints and u.field in body and not u.noop(body[u.field], body):
            message = u.message or (f"{u.field} is not supported by this server and would change "
                                    f"the output; use {u.accepted}")
            raise PydanticCustomError("unsupported_option", message, {"param": u.field})


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = Field(None, description="An adapter name, or the base model's name for no adapter")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=1e4, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="Extension: 0 or -1 disables")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="Extension")
    ignore_eos: bool = Field(False, description="Extension")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    endpoint: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unsupported(data, cls.endpoint)
        return data

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    endpoint: ClassVar[str] = "completions"
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Text = Field(min_length=1, max_length=64)
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[Any] | None = Field(None, description="Refused unless empty: tools are not supported")

    @model_validator(mode="after")
    def _no_tool_calls(self) -> ChatMessage:
        if self.tool_calls:  # the template would render them: dropping them changes the prompt
            raise ValueError("tool_calls in messages are not supported by this server")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    endpoint: ClassVar[str] = "chat"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="Extension")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Text = Field(min_length=1, max_length=256)
    lora_path: Text = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Text = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # accepted for vLLM clients, unused


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "drlora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
