"""What /v1/completions and /v1/chat/completions share: prompt checks, sampling parameters,
running engine requests (a group per HTTP request: submitted together, with latency metrics,
aborted together) and merging several requests' snapshots into one stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from drlora_serve.types import InvalidRequestError, RequestOutput, SamplingParams, StructuredOutputsParams
from server.errors import APIError, bad_request, from_exception
from server.state import ServerState


# text longer than this is tokenized in a worker thread (the tokenizer releases the GIL): a
# 10 MB prompt takes seconds, during which the event loop must keep answering everyone else
OFF_LOOP_CHARS = 4096


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def off_loop(fn, size: int):
    """fn() inline when the work is small (`size` characters), else in a worker thread."""
    return fn() if size < OFF_LOOP_CHARS else await asyncio.to_thread(fn)


def check_count(state: ServerState, num_prompts: int, n: int) -> None:
    """Refuse a request whose prompts x n exceed --max-prompts-per-request (before any work:
    tokenizing, let alone generating, an unbounded list would hold the server)."""
    limit = state.config.max_prompts_per_request
    if num_prompts * n > limit:
        raise bad_request(
            f"This request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} completions; "
            f"this server allows at most {limit} per request (--max-prompts-per-request). "
            "Split it into several requests.", "prompt" if num_prompts > 1 else "n")


def check_text(state: ServerState, chars: int, param: str = "prompt", where: str = "prompt") -> None:
    """Refuse text that cannot fit the context before tokenizing it (see max_prompt_chars)."""
    if chars > state.max_prompt_chars:
        limit = state.engine.max_model_len
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your {where} has "
            f"{chars} characters, far more than {limit} tokens can hold. Please reduce the length "
            f"of the {where}.", param)


def check_prompt(state: ServerState, ids: list[int], max_tokens: int | None, param: str = "prompt",
                 where: str = "prompt") -> int:
    """Refuse empty / out-of-vocabulary / too long prompts; return the resolved max_tokens
    (None: whatever room the context has left)."""
    if not ids:
        raise bad_request(f"The {where} is empty", param)
    limit = state.engine.max_model_len
    if len(ids) >= limit and not (max_tokens == 0 and len(ids) <= limit):
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your {where} "
            f"has {len(ids)} tokens, which leaves no room for generation. Please reduce the "
            f"length of the {where}.", param)
    vocab = len(state.engine.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary (size {vocab})", param)
    if max_tokens is None:
        return limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the {where}, {max_tokens} in the "
            f"completion). Please reduce the length of the {where} or max_tokens.", "max_tokens")
    return max_tokens


def structured_of(req, defaults: dict | None = None) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's output constraint and the field that set it: response_format (json_object,
    json_schema), structured_outputs, or vLLM's guided_json / guided_regex / guided_choice /
    guided_grammar; at most one of them. `defaults`: the server's --structured-outputs-config."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        found.append(("response_format", StructuredOutputsParams(json=rf.json_schema.json_schema)
                      if rf.type == "json_schema" else StructuredOutputsParams(json_object=True)))
    so = req.structured_outputs
    if so is not None and any(v is not None and v is not False for v in (so.json_, so.regex, so.choice, so.grammar,
                                                                         so.json_object)):
        found.append(("structured_outputs", StructuredOutputsParams(
            json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar, json_object=so.json_object)))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        v = getattr(req, name)
        if v is not None:
            found.append((name, StructuredOutputsParams(**{key: v})))
    if len(found) > 1:
        raise bad_request(f"{found[0][0]} and {found[1][0]} both constrain the output; give one of them",
                          found[1][0])
    if not found:
        return None, None
    name, so = found[0]
    return with_options(so, req, defaults), name


def constraint_field(req, constraint: tuple[StructuredOutputsParams, str] | None = None) -> str | None:
    """The request field that set its output constraint (`constraint`: the caller's, as in
    sampling_params), None without one."""
    return constraint[1] if constraint is not None else structured_of(req)[1]


OPTION_KEYS = ("disable_any_whitespace", "disable_additional_properties")


def with_options(so: StructuredOutputsParams, req, defaults: dict | None) -> StructuredOutputsParams:
    """`so` with the options of structured outputs: the server's --structured-outputs-config,
    overridden by those the request's `structured_outputs` sets, whichever field gave the
    constraint (`{"disable_any_whitespace": true}` beside `response_format` or tools too)."""
    opts = {k: v for k, v in (defaults or {}).items() if k in OPTION_KEYS}
    given = getattr(req, "structured_outputs", None)
    if given is not None:
        opts.update({k: getattr(given, k) for k in OPTION_KEYS if k in given.model_fields_set})
    return dataclasses.replace(so, **opts) if opts else so


def vocab_ids(state: ServerState, values, param: str) -> list[int]:
    vocab = len(state.engine.tokenizer)
    bad = next((t for t in values if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is out of vocabulary (size {vocab})", param)
    return list(values)


def sampling_params(state: ServerState, req, max_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, output_kind: str = "final",
                    constraint: tuple[StructuredOutputsParams, str] | None = None) -> SamplingParams:
    """output_kind: "delta" for streamed responses, "final" otherwise (see RequestOutput).
    constraint: (structured outputs, the field that set it) given by the caller (chat tools),
    instead of the request's own."""
    stop_ids = vocab_ids(state, req.stop_token_ids or [], "stop_token_ids")
    top_k = req.top_k if req.top_k not in (None, 0) else -1
    bias = None
    if req.logit_bias:
        if not all(math.isfinite(v) for v in req.logit_bias.values()):  # (before the clamp hides a NaN)
            raise bad_request("logit_bias values must be finite numbers", "logit_bias")
        try:
            bias = {int(k): min(100.0, max(-100.0, v)) for k, v in req.logit_bias.items()}  # vLLM clamps
        except ValueError:
            raise bad_request("logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        vocab_ids(state, bias, "logit_bias")
    defaults = state.config.structured_defaults
    if constraint is not None:
        so, so_field = with_options(constraint[0], req, defaults), constraint[1]
    else:
        so, so_field = structured_of(req, defaults)
    if so is not None:
        try:
            state.grammars.check(so)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), so_field) from None
    try:  # (SamplingParams checks its values: an InvalidRequestError naming the field)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            stop=req.stop_list(),
            stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=req.n,
            output_kind=output_kind,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            min_tokens=req.min_tokens,
            logit_bias=bias,
            allowed_token_ids=vocab_ids(state, req.allowed_token_ids, "allowed_token_ids")
            if req.allowed_token_ids is not None else None,  # ([] is refused by validate(), as vLLM does)
            bad_words=list(req.bad_words) if req.bad_words else None,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            structured_outputs=so,
        )
    except InvalidRequestError as exc:
        raise bad_request(str(exc), exc.param) from None
    return params


def truncate(ids: list[int], req, max_model_len: int) -> list[int]:
    """truncate_prompt_tokens (vLLM): the last k prompt tokens, before the length checks."""
    k = req.truncate_prompt_tokens
    if k is None:
        return ids
    k = max_model_len if k == -1 else k
    return ids[-k:]


def with_cached_tokens(state: ServerState, usage: dict, cached: int) -> dict:
    """Under --enable-prompt-tokens-details, usage.prompt_tokens_details.cached_tokens: the
    prompt tokens the prefix cache served (0 included, unlike vLLM, which leaves the field out
    then); otherwise usage as it is."""
    if state.config.enable_prompt_tokens_details:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


LOGPROB_FLOOR = -9999.0  # vLLM's: JSON has no -inf, the logprob of a token a grammar or a control forbids


def logprob_json(lp: float) -> float:
    """A logprob as the API shows it: at least LOGPROB_FLOOR (NaN too)."""
    return lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR


def prompt_logprobs_json(state: ServerState, entries, k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token (the first None), {token id: {logprob, rank,
    decoded_token}} for the prompt token and the k most likely."""
    out: list[dict | None] = []
    for e in entries or []:
        if e is None:
            out.append(None)
            continue
        d = {}
        for rank, (tid, lp) in enumerate(list(e.top.items())[:k], start=1):
            d[str(tid)] = {"logprob": logprob_json(lp), "rank": rank, "decoded_token": state.token_text(tid)}
        d[str(e.token_id)] = {"logprob": logprob_json(e.logprob), "rank": e.rank,
                              "decoded_token": state.token_text(e.token_id)}
        out.append(d)
    return out


async def _close(it: AsyncIterator) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class Submitted:
    """One engine request, submitted when constructed (the engine's up-front errors become
    an APIError at once). Iterating yields its snapshots and records latency metrics;
    `aclose()` aborts it unless it finished, whether or not it was ever iterated.
    `constraint`: the request field that set its output constraint (see __anext__)."""

    def __init__(self, state: ServerState, ids: list[int], params: SamplingParams, request_id: str,
                 adapter: str | None, constraint: str | None = None) -> None:
        self.state, self.request_id, self.adapter = state, request_id, adapter
        self.constraint = constraint if params.structured_outputs is not None else None
        try:
            self._gen = state.engine.generate(ids, params, request_id, adapter)
        except Exception as exc:
            raise from_exception(exc) from None
        self.finished = self.closed = False
        self.t0 = time.monotonic()
        self.reason: str | None = None  # the first sequence's finish reason, once seen
        state.metrics.request_started(adapter)

    def __aiter__(self) -> Submitted:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self._gen.__anext__()  # (time to first token, inter-token: engine.token_timing)
        except InvalidRequestError as exc:
            # a request the engine refuses while it runs is one whose constraint cannot go on
            # (GrammarEngine.failure; its other checks run up front): the engine does not know
            # which field set the constraint, so the error names none; this one does
            if exc.param is None and self.constraint is not None:
                raise InvalidRequestError(str(exc), self.constraint) from exc
            raise
        if self.reason is None:
            self.reason = next((o.finish_reason for o in out.outputs if o.index == 0 and o.finish_reason), None)
        if out.finished and not self.finished:
            self.finished = True
            self.state.metrics.request_finished(time.monotonic() - self.t0, self.reason or "stop")
        return out

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.metrics.request_done(self.adapter)
        if not self.finished:
            self.state.metrics.request_aborted()
            await _close(self._gen)
            with contextlib.suppress(Exception):
                await self.state.engine.abort(self.request_id)


class RequestGroup:
    """Every engine request of one HTTP request (a prompt each): all submitted before any is
    awaited, so the engine schedules them together, and all aborted together (`aclose`,
    idempotent) when the client goes away, on an error, or when the response ends."""

    def __init__(self, state: ServerState, constraint: str | None = None) -> None:
        self.state = state
        self.constraint = constraint  # the field that set the requests' constraint (constraint_field)
        self.members: list[Submitted] = []

    async def submit_all(self, jobs: list[tuple[list[int], SamplingParams, str, str | None]]) -> None:
        try:
            for ids, params, request_id, adapter in jobs:
                self.members.append(Submitted(self.state, ids, params, request_id, adapter, self.constraint))
        except BaseException:
            await self.aclose()
            raise

    def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return merge(list(self.members))

    async def aclose(self) -> None:
        for member in self.members:
            await member.aclose()


class GroupStreamingResponse(StreamingResponse):
    """A StreamingResponse that aborts its request group however it ends: finished, client
    gone (Starlette cancels the body), or never started."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.group = group

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.group.aclose()


async def merge(its: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the snapshots of several requests as (request index, snapshot)."""
    if len(its) == 1:
        try:
            async for x in its[0]:
                yield 0, x
        finally:
            await _close(its[0])
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async for x in it:
                queue.put_nowait((i, x, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
        finally:
            queue.put_nowait((i, done, None))
            await _close(it)

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(its)]
    remaining = len(tasks)
    try:
        while remaining:
            i, x, exc = await queue.get()
            if exc is not None:
                raise exc
            if x is done:
                remaining -= 1
                continue
            yield i, x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, group: RequestGroup) -> dict[int, RequestOutput]:
    """The final snapshot of every request of the group; a client that hangs up (watched
    from the start) aborts them all."""

    async def drain() -> dict[int, RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for i, out in group.stream():
            last[i] = out
        return last

    work = asyncio.create_task(drain())
    gone = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        if not work.done():
            await asyncio.gather(work, return_exceptions=True)
        await group.aclose()
    if work.cancelled():
        raise APIError(499, "Client disconnected; the request was aborted")
    try:
        return work.result()
    except Exception as exc:  # one request's failure is that request's 500, nothing more
        raise from_exception(exc) from None
