"""Core-side request state: a Request (what the client asked) owns n Sequences (what is generated).

A Sequence is the unit the scheduler and the block manager see; the n sequences of one
request share the prompt (and, through prefix caching, its KV blocks once computed).
Plain bookkeeping, no text: detokenization and stop strings are the frontend's job
(output_processor.py).

With asynchronous scheduling a step is scheduled before the previous step's sampled tokens
reach the host, so a sequence can have tokens *in flight*: counted in `num_tokens` (the
scheduler plans with them), not yet in `token_ids` (their values are still on the device).
"""

from __future__ import annotations

import enum

import torch

from drlora_serve.types import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = ("request", "index", "key", "token_ids", "num_prompt_tokens", "num_tokens", "num_computed_tokens",
                 "status", "block_table", "num_hashed_blocks", "finish_reason", "generator", "max_tokens_total",
                 "stop_ids", "min_tokens_ids", "sample_row", "row", "num_scored_prompt", "grammar")

    def __init__(self, request: Request, index: int, max_model_len: int, eos_token_id: int | None):
        p = request.params
        self.request = request
        self.index = index  # 0..n-1 inside the request
        self.key = request.key + index  # the frontend's id for this sequence
        self.token_ids: list[int] = list(request.prompt_token_ids)  # tokens whose values the host knows
        self.num_prompt_tokens = len(self.token_ids)
        self.num_tokens = self.num_prompt_tokens  # + tokens in flight
        self.num_computed_tokens = 0  # tokens whose KV is (being) written: advanced when scheduled
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []  # physical block ids (block manager bookkeeping)
        self.num_hashed_blocks = 0  # leading full blocks registered for prefix caching
        self.finish_reason: str | None = None
        # the sequence ends at this many tokens (max_tokens or the context length, whichever first)
        self.max_tokens_total = min(self.num_prompt_tokens + p.max_tokens, max_model_len)
        stop = set(p.stop_token_ids)
        if eos_token_id is not None and not p.ignore_eos:
            stop.add(eos_token_id)
        self.stop_ids = frozenset(stop)
        # what min_tokens forbids: the stop ids and eos, even with ignore_eos (vLLM)
        self.min_tokens_ids = self.stop_ids if eos_token_id is None or eos_token_id in stop else stop | {eos_token_id}
        self.sample_row = -1  # this sequence's row in the last launched step's samples
        self.row = -1  # model runner's persistent row (block table mirror), -1: none
        self.num_scored_prompt = 1  # prompt positions whose logprobs were sent (the first has none)
        self.grammar = None  # structured outputs: this sequence's grammar matcher (structured.py)
        self.generator: torch.Generator | None = None
        if p.seed is not None:  # one generator per sequence: reproducible whatever the batch
            self.generator = torch.Generator(device=request.device)
            self.generator.manual_seed((p.seed * 1_000_003 + index) % (1 << 63))

    # ------------------------------------------------------------------ views
    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_inflight(self) -> int:
        return self.num_tokens - len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while more than the last token is still to be computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def done_sampling(self) -> bool:
        """Every token it may produce has been sampled (some may still be in flight)."""
        return self.num_tokens >= self.max_tokens_total

    @property
    def adapter_key(self):
        return self.request.adapter_key

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.index == 0 and self.request.params.prompt_logprobs is not None
                and self.num_scored_prompt < self.num_prompt_tokens)


class Request:
    __slots__ = ("request_id", "key", "prompt_token_ids", "params", "adapter", "adapter_version", "arrival", "device",
                 "seqs", "num_unfinished", "grammar", "num_cached_tokens")

    def __init__(self, request_id: str, key: int, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None, adapter_version, arrival: float, max_model_len: int,
                 eos_token_id: int | None, device: str = "cpu"):
        self.request_id = request_id
        self.key = key  # sequence i is key + i
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.adapter = adapter  # adapter name (None: base model)
        self.adapter_version = adapter_version  # adapter_pool.AdapterVersion pinned for the whole request
        self.arrival = arrival
        self.device = device
        self.seqs = [Sequence(self, i, max_model_len, eos_token_id) for i in range(params.n)]
        self.num_unfinished = params.n
        self.grammar = None  # structured outputs: Future of the compiled grammar (structured.py)
        # prompt tokens the prefix cache gave sequence 0 when first admitted (-1: not yet); a
        # readmission after preemption does not change it (vLLM's num_cached_tokens)
        self.num_cached_tokens = -1

    @property
    def adapter_key(self):
        """Identity for fairness queues and prefix-cache hashing: the pinned version's
        process-unique uid, or None (base). Never (name, version): a name unloaded and loaded
        again restarts at version 1 with other weights, and must not hit the old KV."""
        v = self.adapter_version
        return None if v is None else v.uid

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0
