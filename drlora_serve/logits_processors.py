"""Per-request logits controls, applied batched on the device: allowed_token_ids, bad_words,
min_tokens, logit_bias, repetition / frequency / presence penalties (before temperature) and
min_p (after it). vLLM's names and semantics, in vLLM's order:

    allowed_token_ids -> bad_words -> min_tokens -> logit_bias -> penalties
    -> (greedy argmax) -> temperature -> min_p -> top-k / top-p -> sample

(the masks set -inf, which no later finite addition or scaling changes, so masks and bias
commute). Everything a batch needs is built once per distinct batch (`build_controls`, cached
with the SamplingBatch while the sampled sequences stay the same) as a few flat tensors; a step
whose rows use no control runs none of these ops, and an op runs only on the rows that use it.

Penalties and multi-token bad words need the tokens generated so far. With asynchronous
scheduling the newest of them is still on the device when the next step is launched, so what
they need lives on the device too (`SamplingState`, persistent buffers indexed by the model
runner's per-sequence row): per-row output-token counts (S, V) and a prompt-token mask (S, V)
for the penalties, the last W output tokens (S, W) for multi-token bad words. A row is filled
from the host's tokens when it is assigned (admission: a new sequence has no output, a
preempted one is re-admitted only once none of its tokens is in flight), and advanced on the
device from each step's sampled tokens: exact whatever is in flight, and nothing waits.

Legend: N sampled rows, V vocab, S runner rows (max_num_seqs), W bad-word history,
Np penalised rows, Na rows with allowed_token_ids, M (row, token) bias pairs, Nw multi-token
bad words in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from drlora_serve.sequence import Sequence

NEG_INF = float("-inf")


@dataclass
class LogitsControls:
    """The controls of one distinct batch, as device tensors (None: no row uses it)."""

    # allowed_token_ids: rows and their (Na, V) allowed mask
    allowed_rows: torch.Tensor | None = None  # (Na,) int64
    allowed_mask: torch.Tensor | None = None  # (Na, V) bool
    # logit_bias and single-token bad words (-inf): logits[rows, ids] += vals
    bias_rows: torch.Tensor | None = None  # (M,) int64
    bias_ids: torch.Tensor | None = None  # (M,) int64
    bias_vals: torch.Tensor | None = None  # (M,) fp32
    # penalties: batch rows, their state rows, the values (None: no row in the batch uses it)
    pen_rows: torch.Tensor | None = None  # (Np,) int64
    pen_state: torch.Tensor | None = None  # (Np,) int64
    repetition: torch.Tensor | None = None  # (Np,) fp32
    frequency: torch.Tensor | None = None  # (Np,) fp32
    presence: torch.Tensor | None = None  # (Np,) fp32
    # multi-token bad words: (batch row, state row, right-aligned prefix, its valid part, last token)
    word_rows: torch.Tensor | None = None  # (Nw,) int64
    word_state: torch.Tensor | None = None  # (Nw,) int64
    word_prefix: torch.Tensor | None = None  # (Nw, W) int64
    word_valid: torch.Tensor | None = None  # (Nw, W) bool
    word_last: torch.Tensor | None = None  # (Nw,) int64
    hist_rows: torch.Tensor | None = None  # (H,) batch rows whose last tokens are kept (bad words)
    hist_state: torch.Tensor | None = None  # (H,) their state rows
    # min_tokens: [batch row, sequence] still short of their min_tokens (pruned as they pass)
    min_tokens: list[tuple[int, Sequence]] = field(default_factory=list)

    @property
    def before_sampling(self) -> bool:
        """Any op on the logits before greedy / temperature (min_tokens checked per step)."""
        return (self.allowed_rows is not None or self.bias_rows is not None or self.pen_rows is not None
                or self.word_rows is not None)


def needs_state(seq: Sequence) -> bool:
    p = seq.request.params
    return p.has_penalties or any(len(w) > 1 for w in p.bad_words_token_ids or ())


def build_controls(seqs: list[Sequence], vocab: int, device: torch.device) -> LogitsControls | None:
    """The batch's controls, or None when no row uses any (the common case: nothing to pay)."""
    c = LogitsControls()
    allowed, bias, pen, words, hist = [], [], [], [], []
    any_control = False
    for i, s in enumerate(seqs):
        p = s.request.params
        if p.allowed_token_ids is None and not p.logit_bias and not p.bad_words_token_ids \
                and not p.has_penalties and not p.min_tokens:
            continue
        any_control = True
        if p.allowed_token_ids is not None:
            allowed.append((i, p.allowed_token_ids))
        if p.logit_bias:
            bias.extend((i, t, float(v)) for t, v in p.logit_bias.items())
        multi = False
        for w in p.bad_words_token_ids or ():
            if len(w) == 1:
                bias.append((i, w[0], NEG_INF))
            elif w:
                words.append((i, s.row, w))
                multi = True
        if multi:
            hist.append((i, s.row))
        if p.has_penalties:
            pen.append((i, s.row, p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
        if p.min_tokens and s.num_output_tokens - 1 < p.min_tokens:
            c.min_tokens.append((i, s))
    if not any_control:
        return None

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    if allowed:
        c.allowed_rows = t([i for i, _ in allowed])
        mask = torch.zeros(len(allowed), vocab, dtype=torch.bool)
        for j, (_, ids) in enumerate(allowed):
            mask[j, ids] = True
        c.allowed_mask = mask.to(device)
    if bias:
        c.bias_rows, c.bias_ids = t([b[0] for b in bias]), t([b[1] for b in bias])
        c.bias_vals = t([b[2] for b in bias], torch.float32)
    if pen:
        c.pen_rows, c.pen_state = t([x[0] for x in pen]), t([x[1] for x in pen])
        for k, name, neutral in ((2, "repetition", 1.0), (3, "frequency", 0.0), (4, "presence", 0.0)):
            if any(x[k] != neutral for x in pen):
                setattr(c, name, t([x[k] for x in pen], torch.float32))
    if words:
        W = max(len(w) - 1 for _, _, w in words)
        prefix = np.full((len(words), W), -1, dtype=np.int64)
        valid = np.zeros((len(words), W), dtype=bool)
        for j, (_, _, w) in enumerate(words):
            k = len(w) - 1
            prefix[j, W - k:] = w[:-1]
            valid[j, W - k:] = True
        c.word_rows, c.word_state = t([x[0] for x in words]), t([x[1] for x in words])
        c.word_prefix, c.word_valid = torch.from_numpy(prefix).to(device), torch.from_numpy(valid).to(device)
        c.word_last = t([w[-1] for _, _, w in words])
        c.hist_rows, c.hist_state = t([x[0] for x in hist]), t([x[1] for x in hist])
    return c


class SamplingState:
    """What the controls need of each running sequence's past, on the device, indexed by the
    model runner's row (S rows). Allocated on first use: a server whose requests use no
    penalty or multi-token bad word never holds these buffers."""

    def __init__(self, max_rows: int, vocab: int, device: torch.device):
        self.S, self.V, self.device = max_rows, vocab, device
        self.counts: torch.Tensor | None = None  # (S, V) fp32 output-token counts
        self.prompt_seen: torch.Tensor | None = None  # (S, V) bool tokens of the prompt
        self.recent: torch.Tensor | None = None  # (S, W) int64 last W output tokens, right-aligned, -1: none

    def admit(self, row: int, seq: Sequence) -> None:
        """Fill `row` for `seq` from the tokens the host knows (all of them, at admission)."""
        p = seq.request.params
        dev = self.device
        out = seq.output_token_ids
        if p.has_penalties:
            if self.counts is None:
                self.counts = torch.zeros(self.S, self.V, dtype=torch.float32, device=dev)
            self.counts[row].zero_()
            if out:
                ids = torch.tensor(out, dtype=torch.long, device=dev)
                self.counts[row].index_put_((ids,), torch.ones(len(out), device=dev), accumulate=True)
            if p.repetition_penalty != 1:
                if self.prompt_seen is None:
                    self.prompt_seen = torch.zeros(self.S, self.V, dtype=torch.bool, device=dev)
                self.prompt_seen[row].zero_()
                self.prompt_seen[row, torch.tensor(seq.request.prompt_token_ids, dtype=torch.long, device=dev)] = True
        need = max((len(w) - 1 for w in p.bad_words_token_ids or ()), default=0)
        if need > 0:
            W = 0 if self.recent is None else self.recent.shape[1]
            if need > W:  # grow, keeping every row's newest tokens on the right
                grown = torch.full((self.S, need), -1, dtype=torch.long, device=dev)
                if W:
                    grown[:, need - W:] = self.recent
                self.recent, W = grown, need
            last = out[-W:]
            self.recent[row].fill_(-1)
            if last:
                self.recent[row, W - len(last):] = torch.tensor(last, dtype=torch.long, device=dev)

    def update(self, c: LogitsControls, tokens: torch.Tensor) -> None:
        """Advance the rows of the batch with this step's sampled tokens (N,), on the device.
        A row whose sequence ends meanwhile is refilled by `admit` before it is used again."""
        if c.pen_rows is not None:
            self.counts.index_put_((c.pen_state, tokens[c.pen_rows]),
                                   torch.ones(len(c.pen_rows), device=tokens.device), accumulate=True)
        if c.hist_rows is not None:
            r = c.hist_state
            self.recent[r] = torch.cat([self.recent[r, 1:], tokens[c.hist_rows, None]], dim=1)


def apply_controls(logits: torch.Tensor, c: LogitsControls, state: SamplingState,
                   min_tokens_rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Everything before temperature, in place on logits (N, V) fp32 (a copy the step owns).
    min_tokens_rows: (rows, stop ids) pairs to mask this step."""
    if c.allowed_rows is not None:
        r = c.allowed_rows
        logits[r] = logits[r].masked_fill(~c.allowed_mask, NEG_INF)
    if c.word_rows is not None:  # a multi-token word is masked when its prefix ends the output
        hist = state.recent[c.word_state, -c.word_prefix.shape[1]:]  # (Nw, W)
        hit = ((hist == c.word_prefix) | ~c.word_valid).all(dim=1)
        add = torch.where(hit, NEG_INF, 0.0)
        logits.index_put_((c.word_rows, c.word_last), add, accumulate=True)
    if min_tokens_rows is not None:
        logits[min_tokens_rows] = NEG_INF
    if c.bias_rows is not None:
        logits.index_put_((c.bias_rows, c.bias_ids), c.bias_vals, accumulate=True)
    if c.pen_rows is not None:
        r = c.pen_rows
        x = logits[r]  # (Np, V)
        counts = state.counts[c.pen_state]
        if c.repetition is not None:
            seen = counts > 0
            if state.prompt_seen is not None:
                seen |= state.prompt_seen[c.pen_state]
            p = torch.where(seen, c.repetition[:, None], 1.0)
            x = torch.where(x > 0, x / p, x * p)
        if c.frequency is not None:
            x = x - c.frequency[:, None] * counts
        if c.presence is not None:
            x = x - c.presence[:, None] * (counts > 0)
        logits[r] = x


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits (R, V) after temperature; min_p (R,): tokens whose probability is below min_p
    times the row's top probability are dropped (0: nothing dropped)."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, NEG_INF)


def min_tokens_pairs(c: LogitsControls, skip: set[int] | None = None) -> tuple[list[int], list[int]] | None:
    """(rows, stop ids) to mask this step: rows whose sequence has fewer than min_tokens output
    tokens (the core knows the exact count at schedule time, tokens in flight included).
    Entries that passed are dropped for good (outputs only grow). `skip`: rows to leave alone
    (a grammar that allows nothing but its end)."""
    if not c.min_tokens:
        return None
    rows, ids, keep = [], [], []
    for i, s in c.min_tokens:
        if s.num_output_tokens - 1 < s.request.params.min_tokens:  # before this step's token
            keep.append((i, s))
            if skip is None or i not in skip:
                rows.extend([i] * len(s.min_tokens_ids))
                ids.extend(s.min_tokens_ids)
    c.min_tokens[:] = keep
    return (rows, ids) if rows else None
