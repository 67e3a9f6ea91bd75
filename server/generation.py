"""What /v1/completions and /v1/chat/completions share: prompt checks, sampling parameters,
running engine requests (a group per HTTP request: submitted together, with latency metrics,
aborted together) and merging several requests' snapshots into one stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from drlora_serve.types import InvalidRequestError, RequestOutput, SamplingParams
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


def sampling_params(state: ServerState, req, max_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, output_kind: str = "final") -> SamplingParams:
    """output_kind: "delta" for streamed responses, "final" otherwise (see RequestOutput)."""
    vocab = len(state.engine.tokenizer)
    bad = next((t for t in req.stop_token_ids or [] if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"stop_token_ids: token id {bad} is out of vocabulary (size {vocab})",
                          "stop_token_ids")
    top_k = req.top_k if req.top_k not in (None, 0) else -1
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=req.n,
        output_kind=output_kind,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from None
    return params


async def _close(it: AsyncIterator) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class Submitted:
    """One engine request, submitted when constructed (the engine's up-front errors become
    an APIError at once). Iterating yields its snapshots and records latency metrics;
    `aclose()` aborts it unless it finished, whether or not it was ever iterated."""

    def __init__(self, state: ServerState, ids: list[int], params: SamplingParams, request_id: str,
                 adapter: str | None) -> None:
        self.state, self.request_id, self.adapter = state, request_id, adapter
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
        out = await self._gen.__anext__()  # (time to first token, inter-token: engine.token_timing)
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
            await _close(self._gen)
            with contextlib.suppress(Exception):
                await self.state.engine.abort(self.request_id)


class RequestGroup:
    """Every engine request of one HTTP request (a prompt each): all submitted before any is
    awaited, so the engine schedules them together, and all aborted together (`aclose`,
    idempotent) when the client goes away, on an error, or when the response ends."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.members: list[Submitted] = []

    async def submit_all(self, jobs: list[tuple[list[int], SamplingParams, str, str | None]]) -> None:
        try:
            for ids, params, request_id, adapter in jobs:
                self.members.append(Submitted(self.state, ids, params, request_id, adapter))
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
