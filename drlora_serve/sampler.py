"""Token sampling: greedy, temperature, top-k, top-p; per-sequence generators; logprobs.

Legend: N rows to sample, V vocab. Logprobs are those of the raw model distribution
(log_softmax of the logits before temperature / top-k / top-p), like vLLM's default.
Seeded sequences draw from their own torch.Generator, so their tokens do not depend on what
else is in the batch; unseeded rows share the engine's generator.
"""

from __future__ import annotations

import torch

from drlora_serve.sequence import Sequence
from drlora_serve.types import TokenLogprob


def token_logprob(lp_row: torch.Tensor, token: int, k: int, top=None) -> TokenLogprob:
    """lp_row (V,) log-probs; top: optional precomputed (values, ids) of the row."""
    tl = TokenLogprob(token, float(lp_row[token]))
    if k:
        vals, ids = top if top is not None else torch.topk(lp_row, k)
        tl.top = {int(i): float(v) for i, v in zip(ids[:k].tolist(), vals[:k].tolist())}
    return tl


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        """logits (N, V) fp32 -> [(token id, logprob or None)] per row."""
        n = len(seqs)
        if n == 0:
            return []
        tokens = torch.argmax(logits, dim=-1)  # greedy for every row, overwritten below
        rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rand:
            tokens[rand] = self._sample(logits[rand], [seqs[i] for i in rand])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps: list[TokenLogprob | None] = [None] * n
        if want:
            lp = torch.log_softmax(logits[want], dim=-1)
            kmax = max(seqs[i].params.logprobs for i in want)
            top = torch.topk(lp, kmax, dim=-1) if kmax else None
            toks = tokens[want].tolist()
            for j, i in enumerate(want):
                k = seqs[i].params.logprobs
                lps[i] = token_logprob(lp[j], toks[j], k, (top.values[j], top.indices[j]) if k else None)
        return list(zip(tokens.tolist(), lps))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=dev, dtype=torch.float32)
        logits = logits / temp[:, None]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        V = logits.shape[1]
        rank = torch.arange(V, device=dev)[None, :]
        topk = torch.tensor([s.params.top_k if s.params.top_k > 0 else V for s in seqs], device=dev)
        sorted_logits = sorted_logits.masked_fill(rank >= topk[:, None], float("-inf"))
        topp = torch.tensor([s.params.top_p for s in seqs], device=dev, dtype=torch.float32)
        if (topp < 1).any():
            probs = torch.softmax(sorted_logits, dim=-1)
            before = probs.cumsum(-1) - probs  # mass of the strictly better tokens
            sorted_logits = sorted_logits.masked_fill((before >= topp[:, None]) & (rank > 0), float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # Gumbel-max in exponential form: argmax(p / q), q ~ Exp(1), one draw per row
        q = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        if shared:
            q[shared] = torch.empty(len(shared), V, device=dev).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i] = torch.empty(V, device=dev).exponential_(generator=s.generator)
        pick = torch.argmax(probs / q, dim=-1)  # index into sorted order
        return order.gather(1, pick[:, None]).squeeze(1)
