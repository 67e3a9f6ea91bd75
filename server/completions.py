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


async def prompts_of(state: ServerState, req: CompletionRequest, max_tokens: int | None) -> list[tuple[Prompt, int]]:
    """Each prompt's token ids and resolved max_tokens, checked one by one as they are
    tokenized, so that a request is refused at its first bad prompt without tokenizing the
    rest. Long text is tokenized in a worker thread (the tokenizer releases the GIL)."""
    tok = state.engine.tokenizer
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    many = len(prompt) > 1

    def work() -> list[tuple[Prompt, int]]:
        out = []
        for i, p in enumerate(prompt):
            where = f"prompt {i}" if many else "prompt"
            if isinstance(p, str):
                g.check_text(state, len(p), "prompt", where)
                ids, text = tok.encode(p), p
            else:
                ids, text = list(p), None
            cut = g.truncate(ids, req, state.engine.max_model_len)
            if len(cut) < len(ids):  # echo shows what ran
                ids, text = cut, None
            out.append((Prompt(ids, text), g.check_prompt(state, ids, max_tokens, "prompt", where)))
        return out

    return await g.off_loop(work, sum(len(p) for p in prompt))  # characters or token ids


class LogprobsBuilder:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs, text_offset); each
    top_logprobs entry holds the k most likely and the token itself."""

    def __init__(self, state: ServerState, k: int, offset: int = 0) -> None:
        self.state = state
        self.k = k
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
            # (the engine may have scored more: echo's prompt entries come at prompt_logprobs's k too)
            top = {self.state.token_text(t): g.logprob_json(lp) for t, lp in list(e.top.items())[:self.k]}
            top.setdefault(text, g.logprob_json(e.logprob))  # the chosen token is always listed, like vLLM
            out["token_logprobs"].append(g.logprob_json(e.logprob))
            out["top_logprobs"].append(top)
        return out


def _echo_text(state: ServerState, p: Prompt) -> str:
    return p.text if p.text is not None else state.engine.tokenizer.decode(p.ids)


def _choice(state: ServerState, req: CompletionRequest, p: Prompt, out: RequestOutput,
            o: CompletionOutput, index: int) -> dict:
    text, logprobs = o.text, None
    if req.logprobs is not None:
        lb = LogprobsBuilder(state, req.logprobs)
        if req.echo:
            plp = lb.build(p.ids, out.prompt_logprobs)
            lb.offset = len(_echo_text(state, p))  # token pieces may not add up to the text
            glp = lb.build(o.token_ids, o.logprobs)
            logprobs = {k: plp[k] + glp[k] for k in plp}
        else:
            logprobs = lb.build(o.token_ids, o.logprobs)
    if req.echo:
        text = _echo_text(state, p) + text
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason,
              "stop_reason": o.stop_reason}
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = g.prompt_logprobs_json(state, out.prompt_logprobs, req.prompt_logprobs)
    return choice


def _usage(state: ServerState, prompts: list[Prompt], outs: dict[int, RequestOutput]) -> dict:
    pt = sum(len(p.ids) for p in prompts)
    ct = sum(len(o.token_ids) for out in outs.values() for o in out.outputs)
    # cached tokens summed over the prompts, as prompt_tokens is (vLLM reports one prompt's)
    cached = sum(out.num_cached_tokens or 0 for out in outs.values())
    return g.with_cached_tokens(state, {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}, cached)


@router.post("/v1/completions", responses={200: {"model": CompletionResponse}})
async def create_completion(req: CompletionRequest, request: Request):
    state = get_state(request)
    adapter = state.adapter_for(req.model)
    model = req.model or state.base_name
    many_prompts = isinstance(req.prompt, list) and not isinstance(req.prompt[0], int)
    g.check_count(state, len(req.prompt) if many_prompts else 1, req.n)
    checked = await prompts_of(state, req, req.max_tokens)
    prompts = [p for p, _ in checked]
    prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
    if req.prompt_logprobs is not None:
        prompt_lp = max(prompt_lp or 0, req.prompt_logprobs)
    params = [g.sampling_params(state, req, max_tokens, req.logprobs, prompt_lp,
                                output_kind="delta" if req.stream else "final") for _, max_tokens in checked]
    rid = g.new_id("cmpl")
    group = g.RequestGroup(state, g.constraint_field(req))
    await group.submit_all([(p.ids, sp, f"{rid}-{i}", adapter) for i, (p, sp) in enumerate(zip(prompts, params))])
    if req.stream:
        return g.GroupStreamingResponse(_stream(state, req, rid, model, prompts, group.stream()), group)
    outs = await g.collect(request, group)
    choices = [_choice(state, req, prompts[i], out, o, i * req.n + o.index)
               for i, out in sorted(outs.items()) for o in out.outputs]
    choices.sort(key=lambda c: c["index"])
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": model, "choices": choices, "usage": _usage(state, prompts, outs)})


async def _stream(state: ServerState, req: CompletionRequest, rid: str, model: str,
                  prompts: list[Prompt], stream: AsyncIterator[tuple[int, RequestOutput]]):
    """SSE chunks from the requests' delta outputs (each carries only what is new). With echo,
    a choice's first chunk carries its prompt (and, with logprobs, the prompt's logprobs, which
    may arrive over several steps: the choice's content waits until they are all in)."""
    created = int(time.time())
    builders: dict[int, LogprobsBuilder] = {}  # choice index -> started (echo sent)
    held: dict[int, list[CompletionOutput]] = {}  # choice index -> deltas waiting for the echo
    prompt_lps: dict[int, list] = {}  # prompt index -> its prompt logprobs so far
    tokens: dict[int, int] = {}  # choice index -> completion tokens so far
    cached: dict[int, int] = {}  # prompt index -> its prefix-cache hits (once known)
    opts = req.stream_options
    echo_lp = req.echo and req.logprobs is not None

    def usage(pt: int, ct: int) -> dict:
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

    def render(i: int, idx: int, deltas: list[CompletionOutput]) -> str | None:
        text, logprobs, finish, stop_reason = "", None, None, None
        if idx not in builders:  # first chunk of this choice
            builders[idx] = lb = LogprobsBuilder(state, req.logprobs or 0)
            if req.echo:
                text = _echo_text(state, prompts[i])
                if req.logprobs is not None:
                    logprobs = lb.build(prompts[i].ids, prompt_lps.get(i))
                lb.offset = len(text)
        for o in deltas:
            text += o.text
            if req.logprobs is not None and (o.token_ids or logprobs is None):
                lp = builders[idx].build(o.token_ids, o.logprobs)
                logprobs = lp if logprobs is None else {k: logprobs[k] + lp[k] for k in lp}
            finish = o.finish_reason or finish
            stop_reason = o.stop_reason if o.stop_reason is not None else stop_reason
        if not text and not any(o.token_ids for o in deltas) and finish is None:
            return None
        chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": idx, "text": text, "logprobs": logprobs, "finish_reason": finish,
                              "stop_reason": stop_reason}]}
        if opts and opts.include_usage and opts.continuous_usage_stats:  # this choice's own (as vLLM)
            chunk["usage"] = usage(len(prompts[i].ids), tokens.get(idx, 0))
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        async for i, out in stream:
            if out.num_cached_tokens is not None:
                cached[i] = out.num_cached_tokens
            if out.prompt_logprobs is not None:  # a delta: the entries scored since the last one
                prompt_lps.setdefault(i, []).extend(out.prompt_logprobs)
            scored = not echo_lp or len(prompt_lps.get(i, ())) >= len(prompts[i].ids)
            for o in out.outputs:
                idx = i * req.n + o.index
                tokens[idx] = tokens.get(idx, 0) + len(o.token_ids)
                if idx not in builders and not scored and o.finish_reason is None:
                    held.setdefault(idx, []).append(o)  # the echo needs every prompt logprob first
                    continue
                data = render(i, idx, held.pop(idx, []) + [o])
                if data is not None:
                    yield data
            if scored:  # choices held for this prompt's logprobs, now complete
                for idx in [x for x in held if x // req.n == i]:
                    data = render(i, idx, held.pop(idx))
                    if data is not None:
                        yield data
        if opts and opts.include_usage:
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [], "usage": g.with_cached_tokens(
                         state, usage(sum(len(p.ids) for p in prompts), sum(tokens.values())), sum(cached.values()))}
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:  # noqa: BLE001 - reported inside the stream
        yield sse_error(exc)
    finally:
        await stream.aclose()  # a client that went away aborts the engine requests
    yield "data: [DONE]\n\n"
