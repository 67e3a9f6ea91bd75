"""Per-request state: a Request (what the client asked) owns n Sequences (what is generated).

A Sequence is the unit the scheduler and the block manager see; the n sequences of one
request share the prompt (and, through prefix caching, its KV blocks once computed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from drlora_serve.types import SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, index: int):
        self.request = request
        self.index = index  # 0..n-1 inside the request
        self.seq_id = f"{request.request_id}#{index}"
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []  # physical block ids (block manager bookkeeping)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_hashed_blocks = 0  # leading full blocks registered for prefix caching
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs is not None else None
        self.text = ""  # detokenized output (stop text removed once found)
        self.detok_prefix = 0  # incremental detokenizer offsets (see detokenizer.py)
        self.detok_read = 0
        self.arrival = request.arrival
        seed = request.params.seed
        self.generator: torch.Generator | None = None
        if seed is not None:  # one generator per sequence: reproducible whatever the batch
            self.generator = torch.Generator(device=request.device)
            self.generator.manual_seed((seed * 1_000_003 + index) % (1 << 63))

    # ------------------------------------------------------------------ views
    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while more than the last token is still to be computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def adapter_key(self):
        return self.request.adapter_key

    @property
    def wants_prompt_logprobs(self) -> bool:
        r = self.request
        return (self.index == 0 and r.params.prompt_logprobs is not None
                and len(r.prompt_logprobs) < self.num_prompt_tokens)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None  # adapter name (None: base model)
    adapter_version: object | None  # adapter_pool.AdapterVersion pinned for the whole request
    arrival: float
    device: str = "cpu"
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    aborted: bool = False

    def __post_init__(self):
        self.seqs = [Sequence(self, i) for i in range(self.params.n)]
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob

    @property
    def adapter_key(self):
        """Identity for fairness queues and prefix-cache hashing: the pinned version's
        process-unique uid, or None (base). Never (name, version): a name unloaded and loaded
        again restarts at version 1 with other weights, and must not hit the old KV."""
        v = self.adapter_version
        return None if v is None else v.uid

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
