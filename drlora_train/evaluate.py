"""Held-out evaluation: token loss and exact-match accuracy of greedy completions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drlora_train.data import IGNORE, Example, _ids, collate, scorable


@dataclass(frozen=True)
class EvalConfig:
    max_examples: int = 64
    max_new_tokens: int = 32
    batch_size: int = 16


def token_loss(model, examples: list[Example], pad_id: int, batch_size: int,
               device) -> tuple[float | None, int]:
    """(mean next-token loss, tokens scored) over the labelled tokens of all examples; the
    loss is None when no token was scored (all labels truncated away, say), never 0."""
    examples = [e for e in examples if scorable(e)]
    tot, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                               ignore_index=IGNORE, reduction="sum")
        tot += float(lp)
        n += int((labels != IGNORE).sum())
    return (tot / n if n else None), n


def greedy_completions(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int,
                       device) -> list[str]:
    """Greedy generation (left-padded batches), decoded without special tokens. A prompt of no
    tokens has nothing to continue (generate cannot start from an empty sequence): ''."""
    out = [""] * len(prompts)
    todo = [i for i, p in enumerate(prompts) if _ids(tok, p)]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(todo), batch_size):
            idx = todo[i:i + batch_size]
            enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                out[j] = text
    finally:
        tok.padding_side = side
    return out


@torch.no_grad()
def evaluate(model, tok, examples: list[Example], cfg: EvalConfig, device) -> dict:
    ex = examples[:cfg.max_examples]
    if not ex:
        return {}
    was_training = model.training
    model.eval()
    loss, n_tok = token_loss(model, ex, tok.pad_token_id, cfg.batch_size, device)
    res = {"eval_loss": loss, "eval_tokens": n_tok, "eval_examples": len(ex)}
    # a prompt of no tokens gives nothing to generate from: not scored for exact match
    gen = [e for e in ex if e.prompt is not None and _ids(tok, e.prompt)]
    if gen and cfg.max_new_tokens > 0:
        outs = greedy_completions(model, tok, [e.prompt for e in gen], cfg.max_new_tokens,
                                  cfg.batch_size, device)
        hits = sum(o.strip() == e.reference.strip() for o, e in zip(outs, gen))
        res["exact_match"] = hits / len(gen)
        res["exact_match_examples"] = len(gen)
    model.train(was_training)
    return res
