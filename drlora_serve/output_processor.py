"""Frontend request state: turns the engine core's per-step deltas into text and RequestOutputs.

Per sequence: the tokens so far, incremental detokenization, stop strings (the stop string
and what follows are removed, vLLM's convention; the core is then told to finish the
sequence), logprobs. Stop token ids and eos finish in the core; they are kept in token_ids
and add no text (their own text with include_stop_str_in_output, as vLLM). While a sequence
runs, text that could still be the start of a stop string (`len(longest stop) - 1`
characters) is held back, so streamed text never has to be taken back.

Text is only made incrementally when someone looks at it before the end (streaming, or
cumulative snapshots) or when stop strings must be found; otherwise the finished tokens are
decoded once (`output_kind="final"`, the offline LLM's and non-streaming requests' case).

Output kinds (SamplingParams.output_kind, vLLM's RequestOutputKind):
- "cumulative": every output is a full snapshot so far;
- "delta": each output carries what is new since the previous one (a consumer that falls
  behind gets one merged delta);
- "final": one output, when the request has finished.
"""

from __future__ import annotations

import time

from drlora_serve.detokenizer import IncrementalDetokenizer, added_tokens, decode_all
from drlora_serve.protocol import StepOutputs, error_from
from drlora_serve.types import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob


class SeqState:
    __slots__ = ("index", "token_ids", "logprobs", "cum_logprob", "detok", "parts", "pending", "n_detok",
                 "finish_reason", "stop_reason", "sent_tokens", "sent_parts", "finish_sent")

    def __init__(self, index: int, detok: IncrementalDetokenizer | None, logprobs: bool):
        self.index = index
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.cum_logprob: float | None = 0.0 if logprobs else None  # vLLM's cumulative_logprob
        self.detok = detok  # None: the text is decoded once at the end
        self.parts: list[str] = []  # text that can be shown
        self.pending = ""  # text held back (a stop string may start in it)
        self.n_detok = 0  # tokens whose text is in parts + pending
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop string or stop token id that ended it (vLLM)
        self.sent_tokens = 0  # delta outputs: tokens and text parts already handed out
        self.sent_parts = 0
        self.finish_sent = False


class RequestState:
    __slots__ = ("request_id", "key", "prompt_token_ids", "params", "adapter", "seqs", "prompt_logprobs",
                 "num_unfinished", "hold", "stop_ids", "error", "event", "sent_prompt_lp", "arrival",
                 "last_token_at", "step_tokens", "num_cached_tokens", "decoder")

    def __init__(self, request_id: str, key: int, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None, tokenizer, eos_token_id: int | None, added: dict[int, str] | None = None):
        self.request_id = request_id
        self.key = key
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.adapter = adapter
        stops = [s for s in params.stop if s]
        self.hold = max((len(s) for s in stops), default=1) - 1
        # added tokens joined without spaces: only the incremental path knows how
        joined = None if params.skip_special_tokens or params.spaces_between_special_tokens else added
        incremental = params.detokenize and (bool(stops) or params.output_kind != "final" or joined is not None)
        skip = params.skip_special_tokens
        self.seqs = [SeqState(i, IncrementalDetokenizer(tokenizer, skip, joined) if incremental else None,
                              params.logprobs is not None) for i in range(params.n)]
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.num_unfinished = params.n
        stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            stop_ids.add(eos_token_id)
        self.stop_ids = frozenset(stop_ids)  # mirrors the core: these tokens add no text
        self.error: BaseException | None = None
        self.event = None  # asyncio.Event of the consumer (AsyncLLM), if any
        self.sent_prompt_lp = 0
        self.arrival = time.monotonic()
        self.last_token_at = 0.0  # 0: no token yet
        self.step_tokens = 0  # tokens received in the step being processed
        self.num_cached_tokens: int | None = None  # prefix-cache hits, once the core reports them
        self.decoder = None  # token id -> text for logprobs (the processor's, unless detokenize=False)

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_id: int | None):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self._added: dict[int, str] | None = None  # the tokenizer's added tokens (looked up once)
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[int, tuple[RequestState, SeqState]] = {}  # unfinished sequences by key
        self._next_key = 1
        # token timings of the last process() call: time to first token per request, and
        # (seconds per token, tokens) for requests that already had tokens
        self.ttfts: list[float] = []
        self.itls: list[tuple[float, int]] = []
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """A token's text on its own (Logprob.decoded_token, as vLLM: decoded when read, cached)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None) -> RequestState:
        """Register a request's frontend state; its sequences get keys key .. key + n - 1."""
        key = self._next_key
        self._next_key += params.n
        added = None
        if not params.skip_special_tokens and not params.spaces_between_special_tokens:
            if self._added is None:
                self._added = added_tokens(self.tokenizer)
            added = self._added
        req = RequestState(request_id, key, prompt_token_ids, params, adapter, self.tokenizer, self.eos_token_id,
                           added)
        req.decoder = self.token_text if params.detokenize else None  # logprobs' decoded_token
        self.requests[request_id] = req
        for st in req.seqs:
            self.seqs[key + st.index] = (req, st)
        return req

    def remove(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for st in req.seqs:
                self.seqs.pop(req.key + st.index, None)

    def abort(self, request_id: str) -> RequestState | None:
        """Finish what is unfinished of the request ("abort")."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for st in req.seqs:
            if st.finish_reason is None:
                self._finish(req, st, "abort")
        return req

    def fail(self, req: RequestState, exc: BaseException) -> None:
        req.error = exc
        for st in req.seqs:
            if st.finish_reason is None:
                self._finish(req, st, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ per step
    def process(self, out: StepOutputs) -> tuple[list[RequestState], list[int]]:
        """Apply one step's deltas. Returns the requests that changed, and the sequences a stop
        string finished (the core must be told)."""
        touched: dict[int, RequestState] = {}
        stopped: list[int] = []
        seqs = self.seqs
        lps = out.logprobs
        for key, n in out.cached:  # (a request's key is its first sequence's)
            ent = seqs.get(key)
            if ent is not None:
                ent[0].num_cached_tokens = n
        # prompt logprobs first: a stop string in this step's token may finish the sequence
        for pl in out.prompt_logprobs:
            ent = seqs.get(pl.seq_key)
            if ent is None or ent[0].prompt_logprobs is None:
                continue
            req = ent[0]
            toks = req.prompt_token_ids
            k = req.params.prompt_logprobs
            for j, lp in enumerate(pl.logprobs):
                top = dict(zip(pl.top_ids[j][:k], pl.top_logprobs[j][:k])) if k and pl.top_ids else {}
                rank = pl.ranks[j] if pl.ranks is not None else None
                req.prompt_logprobs.append(TokenLogprob(toks[pl.first + j], lp, top, rank, req.decoder))
            touched[req.key] = req
        for i, (key, tok) in enumerate(zip(out.seq_keys, out.token_ids)):
            ent = seqs.get(key)
            if ent is None:  # finished here already (a stop string), or unknown
                continue
            req, st = ent
            req.step_tokens += 1
            st.token_ids.append(tok)
            if st.logprobs is not None and lps is not None and lps[i] is not None:
                lp, rank, ids, vals = lps[i]
                st.logprobs.append(TokenLogprob(tok, lp, dict(zip(ids, vals)), rank, req.decoder))
                st.cum_logprob += lp
            if st.detok is not None:
                if tok not in req.stop_ids:
                    text = st.detok.step(tok)
                    st.n_detok += 1
                    # stop strings count only in text after min_tokens tokens (vLLM)
                    if text and self._add_text(req, st, text, len(st.token_ids) > req.params.min_tokens):
                        self._finish(req, st, "stop")
                        stopped.append(key)
                elif req.params.include_stop_str_in_output:  # the stop token's own text (vLLM)
                    st.n_detok += 1
                    st.pending += st.detok.step(tok)
            touched[req.key] = req
        now = time.monotonic()
        ttfts, itls = self.ttfts, self.itls = [], []
        for req in touched.values():
            k = req.step_tokens
            if k:
                if req.last_token_at:
                    itls.append(((now - req.last_token_at) / k, k))
                else:
                    ttfts.append(now - req.arrival)
                req.last_token_at, req.step_tokens = now, 0
        for key, reason in out.finished:
            ent = seqs.get(key)
            if ent is not None:
                self._finish(ent[0], ent[1], reason)
                touched[ent[0].key] = ent[0]
        for f in out.failed:
            ent = seqs.get(f.request_key)
            if ent is not None:
                self.fail(ent[0], error_from(f.error_type, f.message))
                touched[ent[0].key] = ent[0]
        return list(touched.values()), stopped

    def _add_text(self, req: RequestState, st: SeqState, text: str, check: bool = True) -> bool:
        """Append new text; True if it completed a stop string (text cut before it).
        check=False: the text cannot end the sequence (min_tokens not reached)."""
        pending = st.pending + text
        stops = req.params.stop
        if stops and check:
            start = max(0, len(pending) - len(text) - req.hold)  # a stop string must end in the new text
            hit = min(((i, s) for s in stops if s and (i := pending.find(s, start)) >= 0), default=None)
            if hit is not None:
                i, s = hit
                st.stop_reason = s
                st.pending = ""
                st.parts.append(pending[:i + len(s)] if req.params.include_stop_str_in_output else pending[:i])
                return True
        cut = len(pending) - req.hold
        if cut > 0:
            st.parts.append(pending[:cut])
            pending = pending[cut:]
        st.pending = pending
        return False

    def _finish(self, req: RequestState, st: SeqState, reason: str) -> None:
        if st.finish_reason is not None:
            return
        st.finish_reason = reason
        if reason == "stop" and st.stop_reason is None and st.token_ids \
                and st.token_ids[-1] in req.params.stop_token_ids:  # eos is not a stop reason (vLLM)
            st.stop_reason = st.token_ids[-1]
        if reason != "stop" or st.pending or not req.params.stop:  # not cut at a stop string
            ids = st.token_ids
            if ids and ids[-1] in req.stop_ids and reason == "stop" and not req.params.include_stop_str_in_output:
                ids = ids[:-1]  # the stop token adds no text (unless asked, as vLLM)
            if not req.params.detokenize:
                st.parts = []  # token ids only (vLLM: text "")
            elif st.detok is None:
                st.parts = [decode_all(self.tokenizer, ids, req.params.skip_special_tokens)]
            else:
                # what the detokenizer still holds (an incomplete character at the end)
                st.parts.append(st.pending + st.detok.flush(ids[:st.n_detok]))
            st.pending = ""
        req.num_unfinished -= 1
        self.seqs.pop(req.key + st.index, None)
        if req.num_unfinished == 0:
            self.requests.pop(req.request_id, None)

    # ------------------------------------------------------------------ outputs
    def failed_output(self, req: RequestState) -> RequestOutput:
        """The final output of a request that failed while running (LLMEngine; AsyncLLM raises
        the error instead): what its sequences had, and the error."""
        outs = [CompletionOutput(st.index, "".join(st.parts), st.token_ids, st.finish_reason) for st in req.seqs]
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, True, req.adapter, error=req.error,
                             num_cached_tokens=req.num_cached_tokens)

    def output(self, req: RequestState, kind: str | None = None) -> RequestOutput | None:
        """The request's output of the given kind now (None: nothing to hand out)."""
        kind = kind or req.params.output_kind
        if req.error is not None:
            raise req.error
        if kind == "final" and not req.finished:
            return None
        outs = []
        if kind == "delta":
            for st in req.seqs:
                new_tokens = st.token_ids[st.sent_tokens:]
                new_parts = st.parts[st.sent_parts:]
                finishing = st.finish_reason is not None and not st.finish_sent
                if not new_tokens and not new_parts and not finishing:
                    continue
                lps = st.logprobs[st.sent_tokens:] if st.logprobs is not None else None
                outs.append(CompletionOutput(st.index, "".join(new_parts), new_tokens, st.finish_reason, lps,
                                             st.stop_reason, st.cum_logprob))
                st.sent_tokens, st.sent_parts = len(st.token_ids), len(st.parts)
                st.finish_sent = st.finish_reason is not None
            plp = None
            if req.prompt_logprobs is not None and len(req.prompt_logprobs) > req.sent_prompt_lp:
                plp = req.prompt_logprobs[req.sent_prompt_lp:]
                req.sent_prompt_lp = len(req.prompt_logprobs)
            if not outs and plp is None:
                return None
            return RequestOutput(req.request_id, req.prompt_token_ids, outs, req.finished, req.adapter, plp,
                                 num_cached_tokens=req.num_cached_tokens)
        copy = kind == "cumulative" and not req.finished
        for st in req.seqs:
            text = "".join(st.parts)
            if len(st.parts) > 1:
                st.parts = [text]  # keep joins cheap for the next snapshot
            ids = list(st.token_ids) if copy else st.token_ids
            lps = (list(st.logprobs) if copy else st.logprobs) if st.logprobs is not None else None
            outs.append(CompletionOutput(st.index, text, ids, st.finish_reason, lps, st.stop_reason, st.cum_logprob))
        plp = req.prompt_logprobs
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, req.finished, req.adapter,
                             list(plp) if copy and plp is not None else plp, num_cached_tokens=req.num_cached_tokens)
