"""Token sampling on the device: grammar masks, the logits controls (logits_processors.py),
greedy, temperature, min_p, top-k, top-p; per-sequence generators; logprobs. Nothing here
reads the device: results stay tensors until the step is waited on.

Legend: N rows to sample, V vocab, K logprobs asked (the largest in the batch), R rows that
sample at random, Nc grammar-constrained rows, W32 = ceil(V / 32) bitmask words.
Logprobs are those of the raw model distribution (log_softmax of the logits before the
controls, temperature, min_p, top-k and top-p; after the grammar mask, as vLLM's default
raw logprobs). Seeded sequences draw from their own torch.Generator, so their tokens do not
depend on what else is in the batch; unseeded rows share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from drlora_serve.logits_processors import (
    LogitsControls,
    SamplingState,
    apply_controls,
    apply_min_p,
    build_controls,
)
from drlora_serve.sequence import Sequence
from kernels.token_bitmask import apply_token_bitmask_, mask_rows_np


@dataclass
class SamplingBatch:
    """Per-step sampling inputs, built once per distinct batch (decode steps reuse it)."""

    num_rows: int
    rand_rows: torch.Tensor | None  # (R,) rows that sample (not greedy), None: all greedy
    temperature: torch.Tensor | None  # (R,) fp32
    top_k: torch.Tensor | None  # (R,) int64, V = off
    top_p: torch.Tensor | None  # (R,) fp32, None when no row uses it
    shared_rows: list[int]  # positions in rand_rows drawing from the engine's generator
    seeded: list[tuple[int, torch.Generator]]  # (position in rand_rows, the sequence's generator)
    max_logprobs: int  # K (0: the chosen token's logprob only)
    want_logprobs: bool
    min_p: torch.Tensor | None = None  # (R,) fp32, None when no row uses it
    controls: LogitsControls | None = None  # per-request logits controls, None: no row uses any
    constrained: list[tuple[int, Sequence]] | None = None  # (row, sequence) with a grammar
    constrained_rows: torch.Tensor | None = None  # (Nc,) int64 their rows


@dataclass
class StepExtras:
    """What changes every step, given to the sampler with the logits."""

    grammar_rows: torch.Tensor | None = None  # (Nc,) rows to mask
    bitmask: torch.Tensor | None = None  # (Nc, W32) int32 on the device: bit t of row i = token t allowed
    min_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, stop ids) masked this step


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # (N,) int64
    logprob: torch.Tensor | None = None  # (N,) fp32, the chosen token's
    rank: torch.Tensor | None = None  # (N,) int64, the chosen token's vLLM rank (tokens at least as likely)
    top_ids: torch.Tensor | None = None  # (N, K) int64
    top_logprobs: torch.Tensor | None = None  # (N, K) fp32


def build_sampling_batch(seqs: list[Sequence], vocab: int, device: torch.device) -> SamplingBatch:
    rand = [i for i, s in enumerate(seqs) if not s.request.params.greedy]
    want = [s.request.params.logprobs for s in seqs if s.request.params.logprobs is not None]
    b = SamplingBatch(len(seqs), None, None, None, None, [], [], max(want, default=0), bool(want))
    b.controls = build_controls(seqs, vocab, device)
    constrained = [(i, s) for i, s in enumerate(seqs) if s.grammar is not None]
    if constrained:
        b.constrained = constrained
        b.constrained_rows = torch.tensor([i for i, _ in constrained], dtype=torch.long, device=device)
    if rand:
        ps = [seqs[i].request.params for i in rand]
        b.rand_rows = torch.tensor(rand, dtype=torch.long, device=device)
        b.temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=device)
        b.top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in ps], dtype=torch.long, device=device)
        if any(p.top_p < 1 for p in ps):
            b.top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=device)
        if any(p.min_p > 0 for p in ps):
            b.min_p = torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=device)
        for j, i in enumerate(rand):
            g = seqs[i].generator
            if g is None:
                b.shared_rows.append(j)
            else:
                b.seeded.append((j, g))
    return b


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, b: SamplingBatch, state: SamplingState | None = None,
                 extras: StepExtras | None = None) -> SamplerOutput:
        """logits (N, V) fp32 -> sampled tokens and logprobs, on the device. The logits are
        not changed (a copy is made when masks or controls apply)."""
        c = b.controls
        mt = extras.min_tokens if extras is not None else None
        grammar = extras is not None and extras.bitmask is not None
        if grammar and c is None and mt is None and b.rand_rows is None and not b.want_logprobs \
                and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return SamplerOutput(greedy_masked_cpu(logits, extras.grammar_rows, extras.bitmask))
        if grammar or mt is not None or (c is not None and c.before_sampling):
            logits = logits.clone()
        if grammar:
            apply_token_bitmask_(logits, extras.grammar_rows, extras.bitmask)
        lp = torch.log_softmax(logits, dim=-1) if b.want_logprobs else None  # raw (after the grammar)
        if c is not None:
            apply_controls(logits, c, state, mt)
        elif mt is not None:
            logits[mt] = float("-inf")
        if logits.device.type == "cpu":  # numpy's argmax is vectorised; torch's CPU one is ~8x slower
            tokens = torch.from_numpy(np.argmax(logits.numpy(), axis=-1).astype(np.int64))
        else:
            tokens = torch.argmax(logits, dim=-1)  # greedy for every row, overwritten below
        if b.rand_rows is not None:
            tokens[b.rand_rows] = self._sample(logits[b.rand_rows], b)
        if c is not None and state is not None:
            state.update(c, tokens)
        out = SamplerOutput(tokens)
        if lp is not None:
            chosen = lp.gather(1, tokens[:, None])  # (N, 1)
            out.logprob = chosen.squeeze(1)
            out.rank = (lp >= chosen).sum(dim=1)  # as the prompt tokens' (model_runner._prompt_logprobs)
            if b.max_logprobs:
                out.top_logprobs, out.top_ids = torch.topk(lp, b.max_logprobs, dim=-1)
        return out

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        dev = logits.device
        logits = logits / b.temperature[:, None]
        if b.min_p is not None:
            logits = apply_min_p(logits, b.min_p)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (R, V)
        V = logits.shape[1]
        rank = torch.arange(V, device=dev)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= b.top_k[:, None], float("-inf"))
        if b.top_p is not None:
            probs = torch.softmax(sorted_logits, dim=-1)
            before = probs.cumsum(-1) - probs  # mass of the strictly better tokens
            sorted_logits = sorted_logits.masked_fill((before >= b.top_p[:, None]) & (rank > 0), float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # Gumbel-max in exponential form: argmax(p / q), q ~ Exp(1), one draw per row
        q = torch.empty_like(probs)
        if b.shared_rows:
            q[b.shared_rows] = torch.empty(len(b.shared_rows), V, device=dev).exponential_(generator=self.generator)
        for j, g in b.seeded:
            q[j] = torch.empty(V, device=dev).exponential_(generator=g)
        pick = torch.argmax(probs / q, dim=-1)  # index into sorted order
        return order.gather(1, pick[:, None]).squeeze(1)


def greedy_masked_cpu(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(N,) int64 greedy tokens under the constrained rows' grammar masks, on the CPU, without
    copying or masking the whole (N, V) logits: every row's argmax, then the constrained rows'
    again on a masked copy of those rows alone.

    Measured inside benchmarks/host_overhead.py (32 of 64 rows constrained, 849 tokens), this
    beats checking each row's unmasked argmax against its mask first and masking only the rows
    it refuses (llama.cpp's way): ~57-59 vs ~80-82 us a step, as the check's per-row Python and
    the gathers of a row subset cost more than masking every constrained row (RESULTS.md)."""
    a = logits.numpy()
    tokens = np.argmax(a, axis=-1)
    r = rows.numpy()
    sub = a.take(r, axis=0)  # (Nc, V) copy; `take` costs less than fancy indexing at these sizes
    mask_rows_np(sub, bitmask.numpy())
    tokens[r] = sub.argmax(axis=-1)
    return torch.from_numpy(tokens.astype(np.int64, copy=False))
