"""LLMEngine: the synchronous core. `step()` = schedule, run, postprocess.

Not thread safe: LLM calls it directly, AsyncLLMEngine from its one engine thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from drlora.models import resolve_model, weights_fingerprint

from drlora_serve.adapter_pool import AdapterPool
from drlora_serve.block_manager import BlockManager
from drlora_serve.config import EngineArgs
from drlora_serve.detokenizer import Detokenizer
from drlora_serve.model_runner import ModelRunner
from drlora_serve.sampler import Sampler, token_logprob
from drlora_serve.scheduler import Scheduler
from drlora_serve.sequence import Request, Sequence
from drlora_serve.types import (
    AdapterInfo,
    CompletionOutput,
    EngineStats,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class LLMEngine:
    def __init__(self, args: EngineArgs, model_dir: Path | None = None, runner: ModelRunner | None = None, tokenizer=None):
        self.args = args
        self.model_dir = model_dir or resolve_model(args.model, dummy=args.load_format == "dummy")
        self.model_name = args.served_model_name or args.model
        self.runner = runner or ModelRunner(args, self.model_dir)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_id = self.tokenizer.eos_token_id
        self.blocks = BlockManager(self.runner.kv.num_blocks, args.block_size, args.enable_prefix_caching)
        self.pool = AdapterPool(self.runner.shape, self.runner.lora, args.max_cpu_loras, args.max_lora_rank,
                                weights_fingerprint(self.model_dir))
        self.scheduler = Scheduler(self.blocks, self.pool, args.max_num_seqs, args.max_num_batched_tokens)
        self.sampler = Sampler(self.runner.device, args.seed)
        self.detok = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self.stats_counters = EngineStats()
        if args.adapters_dir:
            for sub in sorted(Path(args.adapters_dir).iterdir()):
                if sub.is_dir():
                    self.pool.register(sub.name, sub)
        for name, path in args.lora_modules.items():
            self.pool.register(name, path)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None = None) -> Request:
        params.validate()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id '{request_id}' is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.runner.config["vocab_size"]
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum context "
                f"length {self.max_model_len}")
        need = self.blocks.blocks_for(n + params.max_tokens)
        if need > self.blocks.num_blocks:
            raise InvalidRequestError(f"request needs {need} KV blocks but the cache has {self.blocks.num_blocks}")
        version = self.pool.acquire(adapter) if adapter is not None else None  # AdapterNotFoundError
        req = Request(request_id, list(prompt_token_ids), params, adapter, version, time.monotonic(),
                      device=str(self.runner.device))
        self.requests[request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        req.aborted = True
        return self._finish_request(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.stats_counters.num_preemptions_total += batch.num_preempted
        if batch.empty:
            return []
        logits = self.runner.execute(batch)
        touched: dict[str, Request] = {}
        for seq, start, rows in logits.prompt_rows:
            self._prompt_logprobs(seq, start, rows)
        for seq, n in batch.chunks:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
            touched[seq.request.request_id] = seq.request
            if seq.num_computed_tokens <= seq.num_prompt_tokens:
                self.stats_counters.prompt_tokens_total += n
        if logits.sample_seqs:
            sampled = self.sampler(logits.sample_logits, logits.sample_seqs)
            for seq, (tok, lp) in zip(logits.sample_seqs, sampled):
                self._append(seq, tok, lp)
        outs = []
        for req in touched.values():
            if req.finished:
                outs.append(self._finish_request(req))
            else:
                outs.append(self.snapshot(req))
        return outs

    def _prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        req, k = seq.request, seq.params.prompt_logprobs
        if len(req.prompt_logprobs) != start + 1:
            return  # already scored (recompute after preemption)
        lp = torch.log_softmax(logits, dim=-1)
        toks = seq.token_ids[start + 1:start + 1 + lp.shape[0]]
        for j, t in enumerate(toks):
            req.prompt_logprobs.append(token_logprob(lp[j], t, k))

    def _append(self, seq: Sequence, tok: int, lp) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.max_tokens:  # max_tokens == 0: prompt scoring only
            self.scheduler.finish(seq, "length")
            return
        seq.token_ids.append(tok)
        self.stats_counters.generation_tokens_total += 1
        if seq.logprobs is not None:
            seq.logprobs.append(lp)
        reason = None
        if tok in p.stop_token_ids or (tok == self.eos_token_id and not p.ignore_eos):
            reason = "stop"
        else:
            delta = self.detok.append(seq)
            if self.detok.find_stop(seq, len(delta)):
                reason = "stop"
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if reason == "length":
                self.detok.append(seq, flush=True)
            self.scheduler.finish(seq, reason)

    # ------------------------------------------------------------------ outputs
    def snapshot(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, self.detok.visible_text(s), list(s.output_token_ids), s.finish_reason,
                                 list(s.logprobs) if s.logprobs is not None else None) for s in req.seqs]
        return RequestOutput(req.request_id, list(req.prompt_token_ids), outs, req.finished, req.adapter,
                             list(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None)

    def _finish_request(self, req: Request) -> RequestOutput:
        out = self.snapshot(req)
        if self.requests.pop(req.request_id, None) is not None:
            if req.adapter_version is not None:
                self.pool.release(req.adapter_version)
            self.stats_counters.requests_finished_total += 1
        return out

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
        c = self.stats_counters
        running = self.scheduler.running
        waiting = self.scheduler.waiting_seqs()
        return EngineStats(
            num_running=len(running), num_waiting=len(waiting), kv_cache_usage=self.blocks.usage,
            running_adapters=sorted({s.request.adapter for s in running if s.request.adapter}),
            waiting_adapters=sorted({s.request.adapter for s in waiting if s.request.adapter}),
            max_loras=self.args.max_loras, prompt_tokens_total=c.prompt_tokens_total,
            generation_tokens_total=c.generation_tokens_total, num_preemptions_total=c.num_preemptions_total,
            requests_finished_total=c.requests_finished_total)
