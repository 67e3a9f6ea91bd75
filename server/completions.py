"""POST /v1/completions: prompts as text or token ids, n, echo, logprobs, streaming."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from drlora_serve.types import CompletionOutput, RequestOutput, TokenLogprob
from server import generation as g
from server.errors import sse_error
from server.protocol import CompletionRequest, CompletionResponse
from server.state import ServerState, get_state

router = APIRouter()


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # None: given as token ids, decoded only if echo needs it


def prompts_of(state: ServerState, prompt) -> list[Prompt]:
    tok = state.engine.tokenizer
    if isinstance(prompt, str):
        return [Prompt(tok.encode(prompt), prompt)]
    if prompt and isinstance(prompt[0], str):
        return [Prompt(tok.encode(p), p) for p in prompt]
    if prompt and isinstance(prompt[0], int):
        return [Prompt(list(prompt), None)]
    return [Prompt(list(p), None) for p in prompt]


class LogprobsBuilder:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, state: ServerState, offset: int = 0) -> None:
        self.state = state
        self.offset = offset

    def build(self, ids: list[int], entries: list[TokenLogprob | None] | None) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, tid in enumerate(ids):
            e = entries[i] if entries is not None and i < len(entries) else None
            text = self.state.token_text(tid)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.state.token_text(t): lp for t, lp in e.top.items()}
            top.setdefault(text, e.logprob)  # the chosen token is always listed, like vLLM
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(top)
        return out


def _echo_text(state: ServerState, p: Prompt) -> str:
    return p.text if p.text is not None else state.engine.tokenizer.decode(p.ids)


def _choice(state: ServerState, req: CompletionRequest, p: Prompt, out: RequestOutput,
            o: CompletionOutput, index: int) -> dict:
    text, logprobs = o.text, None
    if req.logprobs is not None:
        lb = LogprobsBuilder(state)
        if req.echo:
            plp = lb.build(p.ids, out.prompt_logprobs)
            lb.offset = len(_echo_text(state, p))  # token pieces may not add up to the text
            glp = lb.build(o.token_ids, o.logprobs)
            logprobs = {k: plp[k] + glp[k] for k in plp}
        else:
            logprobs = lb.build(o.token_ids, o.logprobs)
    if req.echo:
        text = _echo_text(state, p) + text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason}


def _usage(prompts: list[Prompt], outs: dict[int, RequestOutput]) -> dict:
    pt = sum(len(p.ids) for p in prompts)
    ct = sum(len(o.token_ids) for out in outs.values() for o in out.outputs)
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}


@router.post("/v1/completions", responses={200: {"model": CompletionResponse}})
async def create_completion(req: CompletionRequest, request: Request):
    state = get_state(request)
    adapter = state.adapter_for(req.model)
    model = req.model or state.base_name
    many_prompts = isinstance(req.prompt, list) and not isinstance(req.prompt[0], int)
    g.check_count(state, len(req.prompt) if many_prompts else 1, req.n)
    prompts = prompts_of(state, req.prompt)
    many = len(prompts) > 1
    params = []
    for i, p in enumerate(prompts):
        max_tokens = g.check_prompt(state, p.ids, req.max_tokens, "prompt",
                                    f"prompt {i}" if many else "prompt")
        prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params.append(g.sampling_params(state, req, max_tokens, req.logprobs, prompt_lp))
    rid = g.new_id("cmpl")
    group = g.RequestGroup(state)
    await group.submit_all([(p.ids, sp, f"{rid}-{i}", adapter) for i, (p, sp) in enumerate(zip(prompts, params))])
    if req.stream:
        return g.GroupStreamingResponse(_stream(state, req, rid, model, prompts, group.stream()), group)
    outs = await g.collect(request, group)
    choices = [_choice(state, req, prompts[i], out, o, i * req.n + o.index)
               for i, out in sorted(outs.items()) for o in out.outputs]
    choices.sort(key=lambda c: c["index"])
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": model, "choices": choices, "usage": _usage(prompts, outs)})


async def _stream(state: ServerState, req: CompletionRequest, rid: str, model: str,
                  prompts: list[Prompt], stream: AsyncIterator[tuple[int, RequestOutput]]):
    created = int(time.time())
    sent_text: dict[int, int] = {}  # choice index -> characters sent
    sent_toks: dict[int, int] = {}
    builders: dict[int, LogprobsBuilder] = {}
    finished: set[int] = set()
    last: dict[int, RequestOutput] = {}
    opts = req.stream_options
    try:
        async for i, out in stream:
            last[i] = out
            p = prompts[i]
            for o in out.outputs:
                idx = i * req.n + o.index
                if idx in finished:
                    continue
                text, logprobs = "", None
                if (idx not in sent_text and req.echo and req.logprobs is not None and o.finish_reason is None
                        and len(out.prompt_logprobs or ()) < len(p.ids)):
                    continue  # a prompt is scored in chunks: echo it once all its logprobs are in
                if idx not in sent_text:  # first chunk of this choice
                    sent_text[idx] = sent_toks[idx] = 0
                    builders[idx] = LogprobsBuilder(state)
                    if req.echo:
                        text = _echo_text(state, p)
                        if req.logprobs is not None:
                            logprobs = builders[idx].build(p.ids, out.prompt_logprobs)
                        builders[idx].offset = len(text)
                new_ids = o.token_ids[sent_toks[idx]:]
                text += o.text[sent_text[idx]:]
                if req.logprobs is not None and (new_ids or logprobs is None):
                    lp = builders[idx].build(new_ids, (o.logprobs or [])[sent_toks[idx]:])
                    logprobs = lp if logprobs is None else {k: logprobs[k] + lp[k] for k in lp}
                sent_text[idx] = len(o.text)
                sent_toks[idx] = len(o.token_ids)
                if o.finish_reason is not None:
                    finished.add(idx)
                if not text and not new_ids and o.finish_reason is None:
                    continue
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": idx, "text": text, "logprobs": logprobs,
                                      "finish_reason": o.finish_reason}]}
                if opts and opts.include_usage and opts.continuous_usage_stats:
                    chunk["usage"] = _usage(prompts, last)
                yield f"data: {json.dumps(chunk)}\n\n"
        if opts and opts.include_usage:
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [], "usage": _usage(prompts, last)}
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:  # noqa: BLE001 - reported inside the stream
        yield sse_error(exc)
    finally:
        await stream.aclose()  # a client that went away aborts the engine requests
    yield "data: [DONE]\n\n"
