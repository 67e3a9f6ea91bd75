"""FakeEngine: a test double of drlora_serve.types.EngineClient (tests only).

It uses the real tiny tokenizer and emits deterministic tokens (a function of prompt, seed,
adapter and position), one per snapshot, so that server logic (deltas, logprobs, echo, n,
errors, aborts) is tested without running a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from drlora.adapter_format import load_config
from drlora_serve.types import (AdapterInfo, AdapterNotFoundError, CompletionOutput,
                                EngineStats, InvalidRequestError, RequestOutput, SamplingParams,
                                TokenLogprob)


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class FakeEngine:
    def __init__(self, tokenizer, model_name: str = "tiny", max_model_len: int = 128,
                 delay: float = 0.0, start_delay: float = 0.0, start_error: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.delay = delay
        self.start_delay, self.start_error = start_delay, start_error
        self.failure: Exception | None = None  # fail_all(): running requests raise it
        self.adapters: dict[str, AdapterInfo] = {}
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.started = self.stopped = False
        self.fail_next = False  # the next generate raises RuntimeError mid-way
        self.fail_list = False  # list_adapters raises RuntimeError (an unexpected failure)
        self.stats_ = EngineStats(max_loras=4)
        # a prefix cache of whole blocks keyed by (adapter, leading tokens), for num_cached_tokens
        self.block_size = 4
        self.cached_prefixes: set[tuple] = set()
        self.token_timing = None

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.start_error:
            raise RuntimeError(self.start_error)
        self.started = True

    def fail_all(self, exc: Exception) -> None:
        self.failure = exc

    async def shutdown(self, graceful: bool = True) -> None:
        self.stopped = True

    def _cache(self, prompt, adapter) -> int:
        """The prompt's cached whole blocks (never its last token, as the engine), then caches them."""
        bs, hit = self.block_size, 0
        while (hit + 1) * bs <= len(prompt) - 1 and (adapter, tuple(prompt[:(hit + 1) * bs])) in self.cached_prefixes:
            hit += 1
        for k in range(1, len(prompt) // bs + 1):
            self.cached_prefixes.add((adapter, tuple(prompt[:k * bs])))
        return hit * bs

    def _token(self, prompt, seed, adapter, i, j) -> int:
        return 5 + _h(tuple(prompt), seed, adapter, i, j) % (len(self.tokenizer) - 5)

    def generate(self, prompt_token_ids, params: SamplingParams, request_id, adapter=None):
        """Validates up front (as the EngineClient protocol says), then streams."""
        params.validate()
        if adapter is not None and adapter not in self.adapters:
            raise AdapterNotFoundError(f"adapter {adapter} not found")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError("too long")
        return self._generate(prompt_token_ids, params, request_id, adapter)

    async def _generate(self, prompt_token_ids, params: SamplingParams, request_id, adapter):
        fail, self.fail_next = self.fail_next, False
        self.running.add(request_id)
        lp = lambda t: TokenLogprob(t, -1.0 - (t % 7) / 10, {t: -1.0 - (t % 7) / 10, 1: -2.5})  # noqa: E731
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] + [lp(t) for t in prompt_token_ids[1:]]
        outs = [CompletionOutput(j, "", [], None, [] if params.logprobs is not None else None)
                for j in range(params.n)]
        sent: dict = {}  # delta outputs: what was handed out per sequence
        t0 = last = time.monotonic()
        cached = self._cache(prompt_token_ids, adapter)
        try:
            self.stats_.prompt_tokens_total += len(prompt_token_ids)
            for i in range(max(params.max_tokens, 0) + 1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if self.failure is not None:
                    raise self.failure
                done = i == params.max_tokens
                for o in outs:
                    if o.finish_reason is not None:
                        continue
                    if done:
                        o.finish_reason = "length"
                        continue
                    if fail and i == 1:
                        raise RuntimeError("boom")
                    t = self._token(prompt_token_ids, params.seed, adapter, i, o.index)
                    o.token_ids.append(t)
                    o.text = self.tokenizer.decode(o.token_ids)
                    if o.logprobs is not None:
                        o.logprobs.append(lp(t))
                    self.stats_.generation_tokens_total += 1
                    for s in params.stop:
                        if s in o.text:
                            o.text = o.text[:o.text.index(s)]
                            o.finish_reason = "stop"
                finished = all(o.finish_reason for o in outs)
                if self.token_timing is not None and not done:
                    now = time.monotonic()
                    if i == 0:
                        self.token_timing([now - t0], [])
                    else:
                        self.token_timing([], [(now - last, 1)])
                    last = now
                out = self._shaped(params.output_kind, request_id, prompt_token_ids, outs, finished,
                                   adapter, prompt_lp, sent)
                if out is not None:
                    out.num_cached_tokens = cached
                    yield out
                if finished:
                    return
        finally:
            if request_id in self.running and not all(o.finish_reason for o in outs):
                self.aborted.append(request_id)
            self.running.discard(request_id)

    @staticmethod
    def _shaped(kind, request_id, prompt, outs, finished, adapter, prompt_lp, sent) -> RequestOutput | None:
        """The output of the request's output_kind, from the cumulative state."""
        if kind == "final" and not finished:
            return None
        if kind != "delta":
            return RequestOutput(request_id, list(prompt),
                                 [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason,
                                                   list(o.logprobs) if o.logprobs is not None else None)
                                  for o in outs], finished, adapter, prompt_lp)
        deltas = []
        for o in outs:
            nt, nx, done = sent.get(o.index, (0, 0, False))
            if done or (len(o.token_ids) == nt and len(o.text) == nx and o.finish_reason is None):
                continue
            deltas.append(CompletionOutput(o.index, o.text[nx:], o.token_ids[nt:], o.finish_reason,
                                           o.logprobs[nt:] if o.logprobs is not None else None))
            sent[o.index] = (len(o.token_ids), len(o.text), o.finish_reason is not None)
        plp = prompt_lp if not sent.get("plp") else None
        sent["plp"] = True
        if not deltas and plp is None:
            return None
        return RequestOutput(request_id, list(prompt), deltas, finished, adapter, plp)

    async def abort(self, request_id: str) -> None:
        pass

    def list_adapters(self) -> list[AdapterInfo]:
        if self.fail_list:
            raise RuntimeError("adapter list unavailable")
        return list(self.adapters.values())

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        cfg = load_config(path)  # NotAnAdapterError / AdapterFormatError
        if name in self.adapters and not replace:
            raise ValueError(f"adapter {name} already loaded")
        old = self.adapters.get(name)
        info = AdapterInfo(name, path, (old.version + 1) if old else 0, cfg.total_ranks(), False)
        self.adapters[name] = info
        return info

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFoundError(name)
        del self.adapters[name]

    def stats(self) -> EngineStats:
        self.stats_.num_running = len(self.running)
        self.stats_.running_adapters = sorted(a for a in self.adapters)[:1]
        return self.stats_

