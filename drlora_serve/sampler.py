"""Token sampling on the device: greedy, temperature, top-k, top-p; per-sequence generators;
logprobs. Nothing here reads the device: results stay tensors until the step is waited on.

Legend: N rows to sample, V vocab, K logprobs asked (the largest in the batch).
Logprobs are those of the raw model distribution (log_softmax of the logits before
temperature / top-k / top-p), like vLLM's default. Seeded sequences draw from their own
torch.Generator, so their tokens do not depend on what else is in the batch; unseeded rows
share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drlora_serve.sequence import Sequence


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


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # (N,) int64
    logprob: torch.Tensor | None = None  # (N,) fp32, the chosen token's
    top_ids: torch.Tensor | None = None  # (N, K) int64
    top_logprobs: torch.Tensor | None = None  # (N, K) fp32


def build_sampling_batch(seqs: list[Sequence], vocab: int, device: torch.device) -> SamplingBatch:
    rand = [i for i, s in enumerate(seqs) if not s.request.params.greedy]
    want = [s.request.params.logprobs for s in seqs if s.request.params.logprobs is not None]
    b = SamplingBatch(len(seqs), None, None, None, None, [], [], max(want, default=0), bool(want))
    if rand:
        ps = [seqs[i].request.params for i in rand]
        b.rand_rows = torch.tensor(rand, dtype=torch.long, device=device)
        b.temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=device)
        b.top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in ps], dtype=torch.long, device=device)
        if any(p.top_p < 1 for p in ps):
            b.top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=device)
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

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        """logits (N, V) fp32 -> sampled tokens and logprobs, on the device."""
        tokens = torch.argmax(logits, dim=-1)  # greedy for every row, overwritten below
        if b.rand_rows is not None:
            tokens[b.rand_rows] = self._sample(logits[b.rand_rows], b)
        out = SamplerOutput(tokens)
        if b.want_logprobs:
            lp = torch.log_softmax(logits, dim=-1)
            out.logprob = lp.gather(1, tokens[:, None]).squeeze(1)
            if b.max_logprobs:
                out.top_logprobs, out.top_ids = torch.topk(lp, b.max_logprobs, dim=-1)
        return out

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        dev = logits.device
        logits = logits / b.temperature[:, None]
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
