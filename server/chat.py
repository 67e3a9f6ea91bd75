"""POST /v1/chat/completions: the tokenizer's chat template, streaming with the role first,
tool calls by structured outputs (server/tools.py)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from drlora_serve.preprocess import chat_prompt
from drlora_serve.types import RequestOutput, TokenLogprob
from server import generation as g
from server import tools as T
from server.errors import bad_request, sse_error
from server.protocol import ChatCompletionRequest, ChatCompletionResponse, TokenizeRequest
from server.state import ServerState, get_state

router = APIRouter()


async def render(state: ServerState, req: ChatCompletionRequest | TokenizeRequest,
                 instead: str = "use /v1/completions") -> list[int]:
    """The chat template (the request's under --trust-request-chat-template, else --chat-template,
    else the tokenizer's) applied to req's messages with its options and tools, and tokenized, in
    a worker thread when the messages are long, so that the event loop keeps serving other
    requests. `instead`: what to do when the model has no chat template."""
    tok = state.engine.tokenizer
    template = req.chat_template
    if template is not None and not state.config.trust_request_chat_template:
        raise bad_request("chat_template in a request needs a server started with --trust-request-chat-template",
                          "chat_template")
    if template is None:
        template = state.config.chat_template  # --chat-template, else (None) the tokenizer's
    messages = [_message(m) for m in req.messages]
    chars = sum(len(m["content"]) for m in messages) + len(template or "")
    g.check_text(state, chars, "messages", "messages")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    return (await g.off_loop(lambda: chat_prompt(
        tok, messages, req.add_generation_prompt, tools, chat_template=template,
        template_kwargs=req.chat_template_kwargs, continue_final_message=req.continue_final_message,
        instead=instead), chars))[1]


def _message(m) -> dict:
    """A message for the chat template; earlier tool calls with their arguments as objects
    when they parse (what templates that render them expect, as vLLM passes them)."""
    d = {"role": m.role, "content": m.text()}
    if m.name:
        d["name"] = m.name
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments) if c.function.arguments else {}
            except (ValueError, RecursionError):  # (not JSON, or nested past the parser's depth)
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        d["tool_calls"] = calls
    return d


def _logprobs(state: ServerState, ids: list[int], entries: list[TokenLogprob] | None,
              k: int) -> list[dict]:
    content = []
    for i, tid in enumerate(ids):
        e = entries[i] if entries is not None and i < len(entries) else None
        text = state.token_text(tid)
        item = {"token": text, "logprob": g.logprob_json(e.logprob) if e else None,
                "bytes": list(text.encode("utf-8")), "top_logprobs": []}
        if e is not None and k:
            top = sorted(e.top.items(), key=lambda kv: -kv[1])[:k]
            item["top_logprobs"] = [{"token": (t := state.token_text(t_id)), "logprob": g.logprob_json(lp),
                                     "bytes": list(t.encode("utf-8"))} for t_id, lp in top]
        content.append(item)
    return content


def _usage(state: ServerState, ids: list[int], out: RequestOutput | None) -> dict:
    ct = sum(len(o.token_ids) for o in out.outputs) if out else 0
    usage = {"prompt_tokens": len(ids), "completion_tokens": ct, "total_tokens": len(ids) + ct}
    return g.with_cached_tokens(state, usage, (out.num_cached_tokens or 0) if out else 0)


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}})
async def create_chat_completion(req: ChatCompletionRequest, request: Request):
    state = get_state(request)
    adapter = state.adapter_for(req.model)
    model = req.model or state.base_name
    g.check_count(state, 1, req.n)
    ids = await render(state, req)
    ids = g.truncate(ids, req, state.engine.max_model_len)
    max_tokens = g.check_prompt(state, ids, req.token_limit(), "messages", "messages")
    k = req.top_logprobs or 0
    tool = T.tool_constraint(req)
    params = g.sampling_params(state, req, max_tokens, k if req.logprobs else None, req.prompt_logprobs,
                               output_kind="delta" if req.stream else "final", constraint=tool)
    rid = g.new_id("chatcmpl")
    group = g.RequestGroup(state, g.constraint_field(req, tool))
    await group.submit_all([(ids, params, rid, adapter)])
    if req.stream:
        return g.GroupStreamingResponse(_stream(state, req, rid, model, ids, group.stream(), tool is not None),
                                        group)
    outs = await g.collect(request, group)
    out = outs.get(0)
    choices = []
    for o in (out.outputs if out else []):
        lp = {"content": _logprobs(state, o.token_ids, o.logprobs, k)} if req.logprobs else None
        message, finish = {"role": "assistant", "content": o.text}, o.finish_reason
        calls = T.tool_calls(req, o.text) if tool is not None and finish == "stop" else None
        if calls is not None:  # (an output cut by max_tokens stays text, finish_reason "length")
            message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, \
                T.finish_reason(req, o.text, finish)
        choices.append({"index": o.index, "message": message, "logprobs": lp, "finish_reason": finish,
                        "stop_reason": o.stop_reason})
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(state, ids, out)}
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = g.prompt_logprobs_json(state, out.prompt_logprobs if out else None,
                                                         req.prompt_logprobs)
    return JSONResponse(body)


async def _stream(state: ServerState, req: ChatCompletionRequest, rid: str, model: str,
                  ids: list[int], stream: AsyncIterator[tuple[int, RequestOutput]], tools: bool = False):
    """SSE chunks from the request's delta outputs (each carries only what is new); with a
    tool constraint, OpenAI's tool-call deltas (a call's id, type and name first, then pieces
    of its arguments) and finish_reason "tool_calls" ("stop" for a named function)."""
    calls = {i: T.ToolCallStream(req) for i in range(req.n)} if tools else None
    created = int(time.time())
    k = req.top_logprobs or 0
    opts = req.stream_options
    tokens = [0] * req.n  # completion tokens per choice
    continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
    cached = 0  # prefix-cache hits, once the engine reports them

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def usage(completion_tokens: int) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens}

    try:
        for i in range(req.n):  # the role comes first, before any content
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}], usage(0) if continuous else None)
        async for _, out in stream:
            if out.num_cached_tokens is not None:
                cached = out.num_cached_tokens
            for o in out.outputs:
                tokens[o.index] += len(o.token_ids)
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                lp = {"content": _logprobs(state, o.token_ids, o.logprobs, k)} if req.logprobs else None
                delta, finish = ({"content": o.text} if o.text else {}), o.finish_reason
                if calls is not None:
                    cs = calls[o.index]
                    entries = cs.feed(o.text)
                    delta = {"tool_calls": entries} if entries else {}
                    finish = T.finish_reason(req, cs.text, finish)
                    # tokens that add no call text (the JSON around the calls, a name not yet
                    # complete) send nothing, as vLLM; their usage counts in the next chunk's,
                    # and with logprobs the chunk stays to carry them
                    if not delta and finish is None and lp is None:
                        continue
                yield chunk([{"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": finish,
                              "stop_reason": o.stop_reason}],
                            usage(tokens[o.index]) if continuous else None)  # this choice's own (as vLLM)
        if opts and opts.include_usage:
            yield chunk([], g.with_cached_tokens(state, usage(sum(tokens)), cached))
    except Exception as exc:  # noqa: BLE001 - reported inside the stream
        yield sse_error(exc)
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"
