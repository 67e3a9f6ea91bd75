"""Continuous batching: decode and (chunked) prefill under a per-step token budget.

Each step: (1) running sequences first (decodes, then prefill chunks, each in admission
order), one token for a decode or the next chunk of a prefill; when blocks run out the most recently admitted running sequence is
preempted (blocks freed, recomputed later: never a failure). (2) If nothing was preempted,
waiting sequences are admitted: preempted ones first, then round-robin over the adapters'
waiting queues (base model = one more queue) so that one tenant's burst cannot starve the
others. Admission needs a free budget, a sequence slot, KV blocks (after prefix-cache hits)
and the adapter resident in the device pool (an adapter queue is skipped for this step when
the pool is held by pinned adapters).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from drlora_serve.adapter_pool import AdapterPool
from drlora_serve.block_manager import BlockManager
from drlora_serve.sequence import Sequence, SeqStatus

_PREEMPTED = object()  # marks the preempted queue (the base model's adapter key is None)


@dataclass
class ScheduledBatch:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, tokens this step)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, pool: AdapterPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.pool = blocks, pool
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.running: list[Sequence] = []
        self.preempted: deque[Sequence] = deque()
        self.queues: OrderedDict[object, deque[Sequence]] = OrderedDict()  # adapter key -> waiting (RR order)
        self.num_preemptions = 0

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
        budget = self.max_tokens
        scheduled: set[int] = set()
        # decodes first (one token each), then prefill chunks, each group in admission order
        order = [s for s in self.running if not s.in_prefill] + [s for s in self.running if s.in_prefill]
        for seq in order:
            if budget <= 0:
                break
            if seq not in self.running:  # preempted by an earlier sequence of this step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_append(seq, n):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.blocks.append(seq, n)
                out.chunks.append((seq, n))
                scheduled.add(id(seq))
                budget -= n
        if out.num_preempted == 0:
            budget = self._admit(out, budget)
        return out

    def _admit(self, out: ScheduledBatch, budget: int) -> int:
        blocked: set = set()  # adapter keys whose adapter cannot be placed this step
        while budget > 0 and len(self.running) < self.max_num_seqs:
            if self.preempted:
                seq, queue_key = self.preempted[0], _PREEMPTED
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
            if not ok:
                break  # out of KV blocks
            budget -= out.chunks[-1][1]
            if queue_key is _PREEMPTED:
                self.preempted.popleft()
            else:
                q = self.queues.pop(queue_key)  # rotate: this adapter goes to the back
                q.popleft()
                if q:
                    self.queues[queue_key] = q
        return budget

    def _try_admit(self, seq: Sequence, out: ScheduledBatch, budget: int) -> bool | None:
        v = seq.request.adapter_version
        if v is not None and self.pool.activate(v) is None:
            return None
        cached = self.blocks.find_cached(seq)
        n = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
        if not self.blocks.admit(seq, cached, n):
            if v is not None:
                self.pool.deactivate(v)
            return False
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        out.chunks.append((seq, n))
        return True

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
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status == SeqStatus.WAITING:
            if seq in self.preempted:
                self.preempted.remove(seq)
            q = self.queues.get(seq.adapter_key)
            if q is not None and seq in q:
                q.remove(seq)
                if not q:
                    del self.queues[seq.adapter_key]
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
