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

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, WrapValidator, model_validator
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


def _by_shape(accepts: str, *members: tuple[Callable[[Any], bool], Any]) -> WrapValidator:
    """Validates a union field as the one member (`(fits(value), type)`) that the value's JSON
    shape selects. Pydantic would try every member and report each one's error under its
    internal tag (`prompt.function-after[_encodable(), str]: ...`); this way an error is the
    chosen member's, at its place (`prompt.0: ...`), and a value that fits no member says what
    the field accepts (rendered as `prompt must be {accepts}`, see errors.py)."""
    adapters = [(fits, TypeAdapter(member)) for fits, member in members]

    def validate(value: Any, handler: Any) -> Any:
        for fits, adapter in adapters:
            if fits(value):
                return adapter.validate_python(value)  # its errors nest under the field's place
        raise PydanticCustomError("accepts", "must be {accepts}", {"accepts": accepts})
    return WrapValidator(validate)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _list_of(*kinds: type) -> Callable[[Any], bool]:
    """A list whose first item is one of `kinds`; an empty list fits the list of strings (whose
    error then says a prompt list must not be empty)."""
    def fits(v: Any) -> bool:
        if not isinstance(v, list):
            return False
        if not v:
            return str in kinds
        return isinstance(v[0], kinds) and not isinstance(v[0], bool)  # a bool is no token id
    return fits


# The union-typed request fields, each with what it accepts in words.
Texts = Annotated[list[Text], Field(min_length=1)]
TokenIdLists = Annotated[list[TokenIds], Field(min_length=1)]
Prompt = Annotated[Text | Texts | TokenIds | TokenIdLists, _by_shape(
    "a string, a list of strings, a list of token ids or a list of lists of token ids",
    (_is_str, Text), (_list_of(str), Texts), (_list_of(int, float), TokenIds), (_list_of(list), TokenIdLists))]
Stop = Annotated[Text | list[Text], _by_shape("a string or a list of strings", (_is_str, Text), (_is_list, list[Text]))]
JsonSchema = Annotated[dict[Text, Any] | Text, _by_shape(
    "a JSON schema: an object, or its JSON text", (_is_dict, dict[Text, Any]), (_is_str, Text))]
LogitBias = Annotated[dict[Text, float], _by_shape("an object mapping token ids to biases",
                                                   (_is_dict, dict[Text, float]))]


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
    # sampling
    Unsupported("use_beam_search", BOTH, _false, "false or omit it"),
    Unsupported("length_penalty", BOTH, _number(1), "1 or omit it"),
    Unsupported("best_of", BOTH, _best_of, "n or omit it"),
    # structured output: the JSON whitespace pattern (use structured_outputs.disable_any_whitespace)
    Unsupported("guided_whitespace_pattern", BOTH, _absent, "omit it"),
    # legacy function calling (use tools / tool_choice)
    Unsupported("functions", CHAT, _empty, "omit it (use tools)"),
    Unsupported("function_call", CHAT, _one_of("none", "auto"), '"none" or omit it (use tool_choice)'),
    # text and prompt handling
    Unsupported("add_special_tokens", COMPLETIONS, _true, "true or omit it"),
    Unsupported("add_special_tokens", CHAT, _false, "false or omit it"),
    Unsupported("suffix", COMPLETIONS, _empty, "omit it"),
    Unsupported("prompt_embeds", COMPLETIONS, _absent, "omit it"),
    Unsupported("echo", CHAT, _false, "false or omit it"),
    Unsupported("documents", CHAT, _empty, "omit it"),
    Unsupported("reasoning_effort", CHAT, _absent, "omit it"),
    Unsupported("modalities", CHAT, _text_modality, '["text"] or omit it'),
    Unsupported("audio", CHAT, _absent, "omit it"),
    Unsupported("web_search_options", CHAT, _absent, "omit it"),
    # extra outputs
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


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Text | None = None
    description: Text | None = None
    json_schema: dict[Text, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema')
        return self


class StructuredOutputsRequest(BaseModel):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid")
    json_: JsonSchema | None = Field(None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool | None = None  # accepted: there is one backend, never a fallback
    disable_additional_properties: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = Field(None, description="An adapter name, or the base model's name for no adapter")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=1e4, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="Extension: 0 or -1 disables")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="Extension (vLLM)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Stop | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="Extension")
    ignore_eos: bool = Field(False, description="Extension")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False, description="Extension (vLLM)")
    min_tokens: int = Field(0, ge=0, description="Extension (vLLM)")
    logit_bias: LogitBias | None = Field(None, description="token id (as a string) -> bias, clamped to [-100, 100]")
    bad_words: list[Text] | None = Field(None, description="Extension (vLLM)")
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="Extension (vLLM)")
    include_stop_str_in_output: bool = Field(False, description="Extension (vLLM)")
    skip_special_tokens: bool = Field(True, description="Extension (vLLM)")
    spaces_between_special_tokens: bool = Field(True, description="Extension (vLLM)")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="Extension (vLLM): keep the last k prompt tokens")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Extension (vLLM)")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = Field(None, description="Extension (vLLM)")
    guided_json: JsonSchema | None = Field(None, description="Extension (vLLM)")
    guided_regex: Text | None = Field(None, description="Extension (vLLM)")
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = Field(None, description="Extension (vLLM)")
    guided_grammar: Text | None = Field(None, description="Extension (vLLM)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    endpoint: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unsupported(data, cls.endpoint)
            if data.get("stream") and data.get("prompt_logprobs") is not None:
                raise PydanticCustomError("unsupported_option", "prompt_logprobs is not available with stream=true",
                                          {"param": "prompt_logprobs"})
            if data.get("stream_options") is not None and not data.get("stream"):  # (as OpenAI and vLLM)
                raise PydanticCustomError("value_error", "stream_options is only allowed when stream is true",
                                          {"param": "stream_options"})
            if data.get("truncate_prompt_tokens") == 0:
                raise PydanticCustomError("value_error", "truncate_prompt_tokens must be -1 or >= 1",
                                          {"param": "truncate_prompt_tokens"})
        return data

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    endpoint: ClassVar[str] = "completions"
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: Text


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Text
    arguments: Text = ""


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn (rendered by the chat template)."""

    model_config = ConfigDict(extra="ignore")
    id: Text | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Text = Field(min_length=1, max_length=64)
    content: Annotated[Text | list[TextPart], _by_shape(
        "a string or a list of content parts", (_is_str, Text), (_is_list, list[TextPart]))] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) else None
        if isinstance(parts, list):
            other = next((p.get("type") for p in parts if isinstance(p, dict) and p.get("type", "text") != "text"), None)
            if other is not None:
                raise PydanticCustomError("unsupported_option", "content parts of type {kind} are not supported: "
                                          "this model takes text only", {"param": "messages", "kind": repr(other)})
        return data

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, AfterValidator(_encodable)] = Field(min_length=1, max_length=256)
    description: Text | None = None
    parameters: dict[Text, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Text


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    endpoint: ClassVar[str] = "chat"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="Extension")
    continue_final_message: bool = Field(False, description="Extension: the last message left open to continue")
    chat_template: Text | None = Field(None, description="Extension: needs --trust-request-chat-template")
    chat_template_kwargs: dict[Text, Any] | None = Field(None, description="Extension: extra template variables")
    tools: list[ChatTool] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice, _by_shape(
        '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        (_is_str, Literal["none", "auto", "required"]), (_is_dict, NamedToolChoice))] | None = None
    parallel_tool_calls: bool = True  # false: at most one call (tool_choice "required")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered by the chat template."""
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # messages only, as the next four
    continue_final_message: bool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[Text, Any] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("one_input", "give exactly one of prompt and messages", {"param": "prompt"})
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Text = Field(min_length=1, max_length=256)
    lora_path: Text = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Text = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # accepted for vLLM clients, unused


class PromptTokenUsageInfo(BaseModel):
    cached_tokens: int = 0  # prompt tokens served by the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None  # --enable-prompt-tokens-details only


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
    stop_reason: int | str | None = None  # the stop string or stop token id (vLLM)


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


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id (vLLM)


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
