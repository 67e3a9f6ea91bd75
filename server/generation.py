"""What /v1/completions and /v1/chat/completions share: prompt checks, sampling parameters,
running engine requests (with latency metrics and guaranteed abort) and merging several
requests' snapshots into one stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from drlora_serve.types import InvalidRequestError, RequestOutput, SamplingParams
from server.errors import APIError, bad_request, from_exception
from server.state import ServerState


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_prompt(state: ServerState, ids: list[int], max_tokens: int | None, param: str = "prompt",
                 where: str = "prompt") -> int:
    """Refuse empty / out-of-vocabulary / too long prompts; return the resolved max_tokens
    (None: whatever room the context has left)."""
    if not ids:
        raise bad_request(f"The {where} is empty", param)
    vocab = len(state.engine.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary (size {vocab})", param)
    limit = state.engine.max_model_len
    if len(ids) >= limit and not (max_tokens == 0 and len(ids) <= limit):
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your {where} "
            f"has {len(ids)} tokens, which leaves no room for generation. Please reduce the "
            f"length of the {where}.", param)
    if max_tokens is None:
        return limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the {where}, {max_tokens} in the "
            f"completion). Please reduce the length of the {where} or max_tokens.", "max_tokens")
    return max_tokens


def sampling_params(state: ServerState, req, max_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
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


async def run(state: ServerState, ids: list[int], params: SamplingParams, request_id: str,
              adapter: str | None) -> AsyncIterator[RequestOutput]:
    """One engine request with metrics; closing this iterator aborts the request."""
    m = state.metrics
    t0 = last = time.monotonic()
    ntok = 0
    first = True
    finished = False
    m.request_started(adapter)
    gen = state.engine.generate(ids, params, request_id, adapter)
    try:
        async for out in gen:
            now = time.monotonic()
            k = max((len(o.token_ids) for o in out.outputs), default=0)
            if k > ntok:
                if first:
                    m.first_token(now - t0)
                    first = False
                else:
                    m.inter_token((now - last) / (k - ntok), k - ntok)
                last, ntok = now, k
            if out.finished:
                finished = True
                reason = out.outputs[0].finish_reason if out.outputs else "stop"
                m.request_finished(now - t0, reason or "stop")
            yield out
    finally:
        m.request_done(adapter)
        if not finished:
            await _close(gen)
            with contextlib.suppress(Exception):
                await state.engine.abort(request_id)


async def prime(it: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Fetch the first snapshot now, so that errors raised up front by the engine become an
    HTTP error status instead of an error inside a 200 stream."""
    try:
        head = await it.__anext__()
    except StopAsyncIteration:
        return _empty()
    except Exception as exc:
        await _close(it)
        raise from_exception(exc) from None
    except BaseException:
        await _close(it)
        raise
    return _chain(head, it)


async def _empty() -> AsyncIterator[RequestOutput]:
    return
    yield  # pragma: no cover


async def _chain(head: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield head
        async for x in rest:
            yield x
    finally:
        await _close(rest)


async def start_all(its: list[AsyncIterator[RequestOutput]]) -> list[AsyncIterator[RequestOutput]]:
    primed: list[AsyncIterator[RequestOutput]] = []
    try:
        for it in its:
            primed.append(await prime(it))
    except BaseException:
        for it in primed + its[len(primed):]:
            await _close(it)
        raise
    return primed


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


async def collect(request: Request, stream: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    """The final snapshot of every request; a client that hangs up aborts them all."""

    async def drain() -> dict[int, RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for i, out in stream:
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
    if work.cancelled() or not work.done():
        await asyncio.gather(work, return_exceptions=True)
        raise APIError(499, "Client disconnected; the request was aborted")
    try:
        return work.result()
    except Exception as exc:  # one request's failure is that request's 500, nothing more
        raise from_exception(exc) from None
