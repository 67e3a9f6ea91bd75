"""Training data: JSONL records -> token ids with a loss mask, held-out split, batches.

Accepted records (one JSON object per line):
- {"prompt": str, "completion": str}: loss on the completion (+ eos) only;
- {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template,
  loss on the assistant turns only;
- {"text": str}: loss on every token (+ eos).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


class DataError(ValueError):
    """A data file is missing or malformed; the message is one line naming file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    prompt: str | None = None  # for exact-match eval: generation prompt (rendered text)
    reference: str | None = None  # expected completion


def scorable(e: Example) -> bool:
    """Has a labelled token to predict (a position after the first): training keeps only
    these, and eval scores only these."""
    return any(x != IGNORE for x in e.labels[1:])


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            problem = _check_record(rec)
            if problem:
                raise DataError(f"{path}:{n}: {problem}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _check_record(rec) -> str | None:
    if not isinstance(rec, dict):
        return "expected a JSON object"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return "each message needs string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return "'messages' has no assistant turn (nothing to train on)"
        return None
    if "prompt" in rec or "completion" in rec:
        if not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)):
            return "'prompt' and 'completion' must both be strings"
        return None
    if "text" in rec:
        return None if isinstance(rec["text"], str) else "'text' must be a string"
    return "expected keys prompt+completion, messages, or text"


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(rec: dict, tok, max_length: int) -> Example:
    eos = tok.eos_token_id
    if "messages" in rec:
        ex = _encode_chat(rec["messages"], tok)
    elif "prompt" in rec:
        p, c = _ids(tok, rec["prompt"]), _ids(tok, rec["completion"]) + [eos]
        ex = Example(p + c, [IGNORE] * len(p) + c, rec["prompt"], rec["completion"])
    else:
        ids = _ids(tok, rec["text"]) + [eos]
        ex = Example(ids, list(ids))
    ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
    return ex


def _encode_chat(msgs: list[dict], tok) -> Example:
    """Render with the chat template; label the characters each assistant turn adds.

    The span of assistant turn i is [len(render(msgs[:i], generation prompt)),
    len(render(msgs[:i+1]))): its content plus the template's end-of-turn marker."""
    def render(m, gen=False):
        return tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

    full = render(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, after = render(msgs[:i], gen=True), render(msgs[: i + 1])
        if not (full.startswith(after) and after.startswith(before)):
            raise DataError("the chat template does not render prefixes stably; use prompt/completion")
        spans.append((len(before), len(after)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE
              for t, (s, _) in zip(ids, enc["offset_mapping"])]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = render(msgs[:last], gen=True)
    return Example(ids, labels, prompt, msgs[last]["content"])


def split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split (shuffled by seed); at least one training record."""
    if eval_fraction <= 0 or len(records) < 2:
        return records, []
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = min(max(1, round(len(records) * eval_fraction)), len(records) - 1)
    held = set(idx[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def load_data(path: str, tok, max_length: int, eval_fraction: float, seed: int,
              eval_path: str | None = None) -> tuple[list[Example], list[Example]]:
    records = read_jsonl(path)
    if eval_path:
        train_recs, eval_recs = records, read_jsonl(eval_path)
    else:
        train_recs, eval_recs = split(records, eval_fraction, seed)
    enc = lambda recs: [encode(r, tok, max_length) for r in recs]
    train = [e for e in enc(train_recs) if scorable(e)]
    if not train:
        raise DataError(f"{path}: no record has a token to train on (after max_length={max_length})")
    return train, enc(eval_recs)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # modulo 2^64: manual_seed refuses larger values (any 64-bit --seed is accepted)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): a pure function of (seed, step), so
    a resumed run sees exactly the data of the uninterrupted one."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos, n)
        take = min(batch_size - len(out), n - i)
        out += epoch_order(n, seed, epoch)[i:i + take]
        pos += take
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (B, S)."""
    S = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), S), IGNORE, dtype=torch.long)
    att = torch.zeros((len(examples), S), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        att[i, :n] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}
