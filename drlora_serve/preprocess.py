"""What the frontend resolves in a request before it goes to the core, which has no tokenizer:
the prompt truncated (`truncate_prompt_tokens`), bad words tokenized, a grammar checked. Shared
by LLMEngine (in process) and AsyncLLM (the server); raises types.InvalidRequestError."""

from __future__ import annotations

import dataclasses

from drlora_serve.structured import GrammarValidator
from drlora_serve.types import InvalidRequestError, SamplingParams


def truncate_prompt(ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens (-1: the context length)."""
    k = params.truncate_prompt_tokens
    if k is None:
        return ids
    k = max_model_len if k == -1 else k
    return ids[-k:] if len(ids) > k else ids


# apply_chat_template's own arguments and the template's reserved variables: not given
# through chat_template_kwargs (they would clash, or change what this function returns)
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None, *, chat_template: str | None = None,
                template_kwargs: dict | None = None, continue_final_message: bool = False,
                instead: str = "give chat_template") -> tuple[str, list[int]]:
    """A conversation as prompt text and token ids (the server's /v1/chat/completions and
    /tokenize, and LLM.chat): the chat template (the model's, or `chat_template`) renders text,
    its special tokens spelled out, which is then encoded without adding special tokens again.
    `template_kwargs`: extra variables of the template (vLLM's chat_template_kwargs, e.g.
    {"enable_thinking": false}); `continue_final_message`: the last message is left open for
    the model to continue, with no generation prompt (vLLM's). Bad options, no template at all
    (`instead`: what the caller can do then) and a template that raises are InvalidRequestErrors."""
    kw = dict(template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_KWARGS & kw.keys())
    if clash:
        raise InvalidRequestError(f"chat_template_kwargs may not set {clash[0]} (a request field or the "
                                  "server's own argument)", "chat_template_kwargs")
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be true "
                                  "(set add_generation_prompt to false)", "continue_final_message")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"This model has no chat template; {instead}", "messages")
    if tools:
        kw["tools"] = tools
    if chat_template is not None:
        kw["chat_template"] = chat_template
    if continue_final_message:
        kw["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kw)
    except Exception as exc:  # noqa: BLE001 - a template may raise on messages it does not accept
        raise InvalidRequestError(f"The chat template refused the messages: {exc}", "messages") from None
    return text, tokenizer.encode(text, add_special_tokens=False)


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word as is (leading spaces stripped) and with
    one leading space (the same word inside a text), the latter only when it tokenizes to as
    many tokens and starts with another token."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


def prepare(params: SamplingParams, prompt_ids: list[int], tokenizer, vocab_size: int, max_model_len: int,
            grammars: GrammarValidator) -> tuple[SamplingParams, list[int]]:
    """The params to send (a copy when something was resolved) and the prompt to run.
    max_tokens None: up to the context length (vLLM)."""
    ids = truncate_prompt(prompt_ids, params, max_model_len)
    if params.max_tokens is None:
        params = dataclasses.replace(params, max_tokens=max(0, max_model_len - len(ids)))
    params.validate()
    if params.bad_words and params.bad_words_token_ids is None:
        params = dataclasses.replace(params, bad_words_token_ids=bad_words_token_ids(tokenizer, params.bad_words))
    params.check_vocab(vocab_size)
    if params.structured_outputs is not None:
        grammars.check(params.structured_outputs)
    return params, ids
