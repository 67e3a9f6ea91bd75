"""Continuous batching: decode and (chunked) prefill under a per-step token budget.

Each step: (1) running sequences first (decodes, then prefill chunks, each in admission
order), one token for a decode or the next chunk of a prefill; when blocks run out the most
recently admitted running sequence is preempted (blocks freed, recomputed later: never a
failure). (2) If nothing was preempted, waiting sequences are admitted: preempted ones first,
then round-robin over the adapters' waiting queues (base model = one more queue) so that one
tenant's burst cannot starve the others. Admission needs a free budget, a sequence slot, KV
blocks (after prefix-cache hits) and the adapter resident in the device pool (an adapter
queue is skipped for this step when the pool is held by pinned adapters).

Scheduling advances the sequences' bookkeeping at once (computed tokens, and one more token
in flight for every chunk that ends a sequence's known tokens), so the next step can be
scheduled before this one's sampled tokens are known (asynchronous scheduling). A decode that
has sampled its last token waits, unscheduled, until the token reaches the host.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from drlora_serve.adapter_pool import AdapterPool
from drlora_serve.block_manager import BlockManager
from drlora_serve.sequence import Sequence, SeqStatus

_PREEMPTED = object()  # marks the preempted queue (the base model's adapter key is None)


@dataclass
class Chunk:
    seq: Sequence
    start: int  # first token position computed by this chunk
    num_tokens: int
    samples: bool  # the chunk ends the sequence's tokens: this step samples the next one


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one token each, sampling
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def chunks(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens this step) in token order: decodes first."""
        return [(s, 1) for s in self.decodes] + [(c.seq, c.num_tokens) for c in self.prefills]


class Scheduler:
    def __init__(self, blocks: BlockManager, pool: AdapterPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.pool = blocks, pool
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.running: list[Sequence] = []
        self.preempted: deque[Sequence] = deque()
        self.queues: OrderedDict[object, deque[Sequence]] = OrderedDict()  # adapter key -> waiting (RR order)
        self.num_preemptions = 0
        # sequences whose adapter could not be activated (its folder changed since it was
        # loaded): the core fails their requests after schedule()
        self.failed: list[tuple[Sequence, Exception]] = []

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        self.queues.setdefault(seq.adapter_key, deque()).append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.preempted) + sum(len(q) for q in self.queues.values())

    def waiting_seqs(self) -> list[Sequence]:
        return list(self.preempted) + [s for q in self.queues.values() for s in q]

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        bs = self.blocks.block_size
        decodes, prefilling = [], []
        for s in self.running:
            if s.num_computed_tokens < s.num_tokens - 1:
                prefilling.append(s)
            elif s.num_tokens < s.max_tokens_total:
                decodes.append(s)
            elif s.num_computed_tokens < s.num_tokens == s.num_prompt_tokens:
                # samples nothing (max_tokens 0, or a prompt that fills the context) and a chunk
                # stopped one short of its prompt: the last prompt token ends it
                prefilling.append(s)
            # else: its last sampled token is in flight
        budget = self.max_tokens
        # fast path (the steady state): every decode fits in the budget and the free blocks
        need = [s for s in decodes if s.num_computed_tokens >= len(s.block_table) * bs]
        if len(decodes) <= budget and len(need) <= self.blocks.num_free_blocks:
            for s in need:
                self.blocks.append(s, 1)
            for s in decodes:
                s.num_computed_tokens += 1
                s.num_tokens += 1  # the token this step samples
            out.decodes = decodes
            budget -= len(decodes)
            budget = self._schedule_running(out, prefilling, budget)
        else:
            budget = self._schedule_running(out, decodes + prefilling, budget)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _schedule_running(self, out: ScheduledBatch, order: list[Sequence], budget: int) -> int:
        """Schedule `order` one by one, preempting the most recently admitted unscheduled
        running sequences when blocks run out."""
        scheduled = {id(s) for s in out.decodes}
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted by an earlier sequence of this step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_append(seq, n):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq, n)
                self._advance(out, seq, n)
                scheduled.add(id(seq))
                budget -= n
        return budget

    def _advance(self, out: ScheduledBatch, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        seq.num_computed_tokens += n
        samples = seq.num_computed_tokens == seq.num_tokens and seq.num_tokens < seq.max_tokens_total
        if samples:
            seq.num_tokens += 1
        if n == 1 and samples and start == seq.num_tokens - 2 and start >= seq.num_prompt_tokens - 1 \
                and not seq.wants_prompt_logprobs:
            out.decodes.append(seq)
        else:
            out.prefills.append(Chunk(seq, start, n, samples))

    def _admit(self, out: ScheduledBatch, budget: int) -> int:
        blocked: set = set()  # adapter keys whose adapter cannot be placed this step
        while budget > 0 and len(self.running) < self.max_num_seqs:
            if self.preempted:
                seq, queue_key = self.preempted[0], _PREEMPTED
                if seq.num_inflight:  # its last sampled token is not known yet
                    break
            else:
                keys = [k for k in self.queues if k not in blocked]
                if not keys:
                    break
                queue_key = keys[0]
                seq = self.queues[queue_key][0]
            ok = self._try_admit(seq, out, budget)
            if ok is None:  # adapter cannot be placed now
                if queue_key is _PREEMPTED:
                    break  # keep preempted work first in line
                blocked.add(queue_key)
                continue
            if ok is False:
                break  # out of KV blocks
            budget = ok
            if queue_key is _PREEMPTED:
                self.preempted.popleft()
            else:
                q = self.queues.pop(queue_key)  # rotate: this adapter goes to the back
                q.popleft()
                if q:
                    self.queues[queue_key] = q
        return budget

    def _try_admit(self, seq: Sequence, out: ScheduledBatch, budget: int) -> int | bool | None:
        """The budget left after admitting seq; False if out of KV blocks; None if its adapter
        cannot be placed now."""
        v = seq.request.adapter_version
        if v is not None:
            try:
                slot = self.pool.activate(v)
            except Exception as exc:  # noqa: BLE001 - its folder cannot be read again: fail this request only
                self.failed.append((seq, exc))
                return None
            if slot is None:
                return None
        cached = self.blocks.find_cached(seq)
        n = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
        if not self.blocks.admit(seq, cached, n):
            if v is not None:
                self.pool.deactivate(v)
            return False
        if seq.index == 0 and seq.request.num_cached_tokens < 0:
            seq.request.num_cached_tokens = seq.num_computed_tokens  # the cached blocks' tokens
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._advance(out, seq, n)
        return budget - n

    # ------------------------------------------------------------------ state changes
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.preempted.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        if seq.request.adapter_version is not None:
            self.pool.deactivate(seq.request.adapter_version)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence wherever it is (running or waiting) and free what it holds."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            if seq in self.preempted:
                self.preempted.remove(seq)
            q = self.queues.get(seq.adapter_key)
            if q is not None and seq in q:
                q.remove(seq)
                if not q:
                    del self.queues[seq.adapter_key]
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
