"""EngineCore: scheduler, model runner and adapter pool. `step()` = schedule, run, postprocess,
and it returns per-step deltas (protocol.StepOutputs): the new token of every sequence that
got one, logprobs, finishes. No text: the frontend detokenizes and checks stop strings.

With `async_scheduling` (the default) one step runs ahead: `step()` schedules and launches
step N+1, then waits for step N's sampled tokens and postprocesses them, so on a GPU the host
prepares N+1 while the device computes N (a step costs max(host, device), not the sum). A
sequence that finished in step N (eos, a stop token) already has a row in step N+1; that row
is computed and dropped. Driven in-process by LLMEngine, or in its own process by
core_proc.py. Not thread safe.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from pathlib import Path

import torch

from drlora.models import resolve_model, weights_fingerprint

from drlora_serve.adapter_pool import AdapterPool
from drlora_serve.block_manager import BlockManager
from drlora_serve.config import EngineArgs
from drlora_serve.model_runner import LaunchedStep, ModelRunner
from drlora_serve.protocol import EngineInfo, PromptLogprobs, RequestFailed, StepOutputs, error_fields
from drlora_serve.scheduler import Scheduler
from drlora_serve.sequence import Request, Sequence, SeqStatus
from drlora_serve.structured import GrammarEngine
from drlora_serve.types import AdapterInfo, EngineStats, InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, args: EngineArgs, model_dir: Path | None = None, runner: ModelRunner | None = None,
                 eos_token_id: int | None = None, tokenizer=None):
        self.args = args
        if args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)
        self.model_dir = Path(model_dir) if model_dir is not None else resolve_model(
            args.model, dummy=args.load_format == "dummy")
        self.model_name = args.served_model_name or args.model
        self.runner = runner or ModelRunner(args, self.model_dir)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.eos_token_id = eos_token_id
        self.blocks = BlockManager(self.runner.kv.num_blocks, args.block_size, args.enable_prefix_caching)
        self.pool = AdapterPool(self.runner.shape, self.runner.lora, args.max_cpu_loras, args.max_lora_rank,
                                weights_fingerprint(self.model_dir))
        self.scheduler = Scheduler(self.blocks, self.pool, args.max_num_seqs, args.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}  # key -> sequence, unfinished ones
        self.counters = EngineStats()
        self.inflight: LaunchedStep | None = None
        self._finished: list[tuple[int, str]] = []  # finishes not yet reported
        self._failed: list[RequestFailed] = []
        self._tokenizer = tokenizer  # for grammars (loaded from the model folder when not given)
        self._grammars: GrammarEngine | None = None
        self._compiling: list[Request] = []  # requests waiting for their grammar
        if args.adapters_dir:
            for sub in sorted(Path(args.adapters_dir).iterdir()):
                if sub.is_dir():
                    self.pool.register(sub.name, sub)
        for name, path in args.lora_modules.items():
            self.pool.register(name, path)

    def info(self) -> EngineInfo:
        return EngineInfo(self.model_name, self.max_model_len, self.vocab_size, self.blocks.num_blocks,
                          self.blocks.block_size, self.list_adapters())

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, key: int, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, arrival: float | None = None) -> Request:
        """Validate and queue a request (raises InvalidRequestError / AdapterNotFoundError)."""
        params.validate()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id '{request_id}' is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum context "
                f"length {self.max_model_len}")
        need = self.blocks.blocks_for(n + params.max_tokens)
        if need > self.blocks.num_blocks:
            raise InvalidRequestError(f"request needs {need} KV blocks but the cache has {self.blocks.num_blocks}")
        params.check_vocab(vocab)
        version = self.pool.acquire(adapter) if adapter is not None else None  # AdapterNotFoundError
        req = Request(request_id, key, list(prompt_token_ids), params, adapter, version,
                      arrival if arrival is not None else time.monotonic(), self.max_model_len,
                      self.eos_token_id, device=str(self.runner.device))
        self.requests[request_id] = req
        for seq in req.seqs:
            self.seqs[seq.key] = seq
        if params.structured_outputs is not None:  # scheduled once its grammar is compiled
            req.grammar = self.grammars.compile(params.structured_outputs)
            self._compiling.append(req)
        else:
            for seq in req.seqs:
                self.scheduler.add(seq)
        return req

    @property
    def grammars(self) -> GrammarEngine:
        if self._grammars is None:
            def load():
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                return self._tokenizer

            self._grammars = GrammarEngine(load, self.vocab_size, self.args.max_num_seqs,
                                           pin=self.runner.device.type == "cuda")
        return self._grammars

    def _admit_compiled(self) -> None:
        """Requests whose grammar is ready join the scheduler (a bad grammar fails them)."""
        waiting = []
        for req in self._compiling:
            fut = req.grammar
            if not fut.done():
                waiting.append(req)
            elif not req.finished:  # (aborted meanwhile: nothing to do)
                exc = fut.exception()
                if exc is not None:
                    self.fail_request(req, exc)
                    continue
                for seq in req.seqs:
                    if not seq.is_finished:
                        seq.grammar = GrammarEngine.matcher(fut.result())
                        self.scheduler.add(seq)
        self._compiling = waiting

    def abort(self, request_id: str) -> bool:
        """Finish every unfinished sequence of the request ("abort"); False if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
        return True

    def finish_seqs(self, keys: list[int], reason: str = "stop") -> None:
        """Sequences the frontend ended (a stop string in their text)."""
        for k in keys:
            seq = self.seqs.get(k)
            if seq is not None:
                self._finish(seq, reason, report=False)

    def fail_request(self, req: Request, exc: BaseException) -> None:
        t, msg = error_fields(exc)
        self._failed.append(RequestFailed(req.key, t, msg))
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort", report=False)

    def fail_all(self, exc: BaseException) -> None:
        """A step failed: fail every request in flight (the engine keeps serving)."""
        self.inflight = None
        for req in list(self.requests.values()):
            self.fail_request(req, exc)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.inflight is not None

    def _finish(self, seq: Sequence, reason: str, report: bool = True) -> None:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq)
        self.seqs.pop(seq.key, None)
        if report:
            self._finished.append((seq.key, seq.finish_reason))
        req = seq.request
        req.num_unfinished -= 1
        if req.num_unfinished == 0 and self.requests.pop(req.request_id, None) is not None:
            if req.adapter_version is not None:
                self.pool.release(req.adapter_version)
            self.counters.requests_finished_total += 1

    # ------------------------------------------------------------------ step
    def step(self) -> StepOutputs:
        out = StepOutputs([], [])
        if self._compiling:
            self._admit_compiled()
            if self._compiling and self.inflight is None and not self.scheduler.has_work():
                # nothing else to do: wait a little for a grammar rather than spin
                concurrent.futures.wait([r.grammar for r in self._compiling], timeout=0.005,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
                self._admit_compiled()
        batch = self.scheduler.schedule()
        for s in batch.preempted:
            self.runner.release(s)
        if self.scheduler.failed:
            for seq, exc in self.scheduler.failed:
                if not seq.is_finished:
                    log.warning("request %s failed: %s", seq.request.request_id, exc)
                    self.fail_request(seq.request, exc)
            self.scheduler.failed = []
        self.counters.num_preemptions_total += len(batch.preempted)
        launched = None
        if not batch.empty:
            launched = self.runner.launch(batch)
        if self.args.async_scheduling:
            done, self.inflight = self.inflight, launched
            if done is not None:
                self._process(done, out)
            if launched is not None and launched.sampled is None:
                self._sample_constrained(launched)
        else:
            if launched is not None and launched.sampled is None:
                self._sample_constrained(launched)
            if launched is not None:
                self._process(launched, out)
        if self._finished:
            out.finished, self._finished = self._finished, []
        if self._failed:
            out.failed, self._failed = self._failed, []
        return out

    def _sample_constrained(self, step: LaunchedStep) -> None:
        """Fill the grammar masks of the step's constrained rows (their matchers are up to
        date: every earlier token has been processed) and launch its sampling."""
        b = step.sampling
        want_ended = b.controls is not None and bool(b.controls.min_tokens)  # (the grammar wins over min_tokens)
        mask, ended = self.grammars.fill(b.constrained, want_ended)
        self.runner.sample(step, mask, ended)

    def _advance_grammars(self, step: LaunchedStep, tokens: list[int]) -> list[Sequence]:
        """Advance the matchers of the step's constrained sequences that are still running with
        their tokens; the sequences whose token a grammar refused (only possible when no
        allowed token was left to sample: allowed_token_ids or bad_words excluding all the
        grammar allows, or a grammar that failed). Their requests fail (HTTP 400)."""
        refused = self.grammars.advance(step.sampling.constrained, tokens)
        for seq in refused:
            self._fail_grammar(seq)
        return refused

    def _fail_grammar(self, seq: Sequence) -> None:
        if not seq.is_finished:  # (a sibling's refusal may have failed the request already)
            exc = GrammarEngine.failure(seq)
            log.warning("request %s failed: %s", seq.request.request_id, exc)
            self.fail_request(seq.request, exc)

    def _process(self, step: LaunchedStep, out: StepOutputs) -> None:
        """Read a launched step's results and apply them: append tokens, finish sequences,
        register newly full blocks for prefix caching."""
        res = step.wait()
        seqs, tokens = step.sample_seqs, res.tokens
        finished = SeqStatus.FINISHED
        drop = any(s.status is finished for s in seqs)  # ended while this step ran: drop their rows
        if step.sampling is not None and step.sampling.constrained is not None:
            if self._advance_grammars(step, tokens):
                drop = True
        if drop:
            keep = [i for i, s in enumerate(seqs) if s.status is not finished]
            seqs, tokens = [seqs[i] for i in keep], [tokens[i] for i in keep]
            if res.logprob is not None:
                res.logprob, res.rank = [res.logprob[i] for i in keep], [res.rank[i] for i in keep]
                if res.top_ids is not None:
                    res.top_ids, res.top_logprobs = [res.top_ids[i] for i in keep], [res.top_logprobs[i] for i in keep]
        out.seq_keys = [s.key for s in seqs]
        out.token_ids = tokens
        self.counters.generation_tokens_total += len(tokens)
        bs = self.blocks.block_size
        caching = self.blocks.enable_prefix_caching
        ended = []
        for seq, tok in zip(seqs, tokens):
            ids = seq.token_ids
            ids.append(tok)
            n = len(ids)
            if n == seq.num_prompt_tokens + 1 and seq.index == 0:
                # vLLM's prompt_tokens: the whole prompt (cached part included), once a request, at its first token
                self.counters.prompt_tokens_total += seq.num_prompt_tokens
                out.cached.append((seq.key, seq.request.num_cached_tokens))
            if tok in seq.stop_ids:
                ended.append((seq, "stop"))
            elif n >= seq.max_tokens_total:
                ended.append((seq, "length"))
            elif caching and min(seq.num_computed_tokens, n) // bs > seq.num_hashed_blocks:
                self.blocks.commit(seq)
        if res.logprob is not None:
            lps = []
            for i, seq in enumerate(seqs):
                k = seq.request.params.logprobs
                lps.append(None if k is None else
                           (res.logprob[i], res.rank[i], res.top_ids[i][:k] if k else [],
                            res.top_logprobs[i][:k] if k else []))
            out.logprobs = lps
        for seq, reason in ended:
            if seq.grammar is not None and seq.grammar.is_error():  # failed, then allowed only the end
                self._fail_grammar(seq)
            else:
                self._finish(seq, reason)
        for seq in step.end_seqs:  # a whole prompt computed, nothing to sample (max_tokens == 0)
            if seq.index == 0:
                self.counters.prompt_tokens_total += seq.num_prompt_tokens
                out.cached.append((seq.key, seq.request.num_cached_tokens))
            if not seq.is_finished:
                self._finish(seq, "length")
        for seq in step.chunk_seqs:
            if not seq.is_finished:
                self.blocks.commit(seq)
        for seq, first, lp, ti, tv, rk in res.prompt:
            out.prompt_logprobs.append(PromptLogprobs(seq.key, first, lp, ti, tv, rk))

    # ------------------------------------------------------------------ adapters & stats
    def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        return self.pool.register(name, path, replace)

    def unload_adapter(self, name: str) -> None:
        self.pool.unregister(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.pool.list()

    def compact_adapters(self) -> int:
        return self.pool.compact()

    def stats(self) -> EngineStats:
        c, g = self.counters, self.runner.graph_stats
        running = self.scheduler.running
        waiting = self.scheduler.waiting_seqs()
        return EngineStats(
            num_running=len(running), num_waiting=len(waiting), kv_cache_usage=self.blocks.usage,
            running_adapters=sorted({s.request.adapter for s in running if s.request.adapter}),
            waiting_adapters=sorted({s.request.adapter for s in waiting if s.request.adapter}),
            max_loras=self.args.max_loras, prompt_tokens_total=c.prompt_tokens_total,
            generation_tokens_total=c.generation_tokens_total, num_preemptions_total=c.num_preemptions_total,
            requests_finished_total=c.requests_finished_total,
            adapter_load_seconds={k: h.copy() for k, h in self.pool.load_seconds.items()},
            cuda_graphs_enabled=g.enabled, cuda_graph_replays_total=g.replays,
            eager_decode_steps_total=g.eager_decode_steps, cuda_graphs_captured=g.captured,
            cuda_graph_lazy_captures_total=g.lazy_captures, cuda_graph_capture_failures_total=g.capture_failures,
            cuda_graph_error=g.error)
