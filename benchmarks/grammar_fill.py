"""Grammar mask filling and matcher advancing: the calling thread (row by row) vs llguidance's
LLExecutor pool, per batch size. This is what `drlora_serve/structured.py`'s PARALLEL_MIN_ROWS
rests on.

    python benchmarks/grammar_fill.py                          # the tiny model's tokenizer (849 tokens)
    python benchmarks/grammar_fill.py --bpe-vocab 50304        # a byte-level BPE of that size
    python benchmarks/grammar_fill.py --threads 1 4 12 --out fill.json

No real tokenizer of a real model's size can be downloaded here, so `--bpe-vocab N` trains a
byte-level BPE with N tokens (the `tokenizers` library) on the Python sources of the installed
packages, in about half a minute. Every row is constrained to host_overhead.py's default
schema, a record with free-text fields. Each step fills every row's mask, then advances each
matcher with the argmax of random logits under its mask (`consume_token` row by row, or the
pool's `consume_token_par`), so the states move the way they do in decoding. Prints
microseconds per step for each, medians over the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repo, uninstalled


def bpe_tokenizer(vocab: int):
    import glob
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "**", "*.py"), recursive=True))[:6000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")


def step_times(compiled, V: int, rows: int, mode: str, threads: int, steps: int, seed: int) -> tuple[float, float]:
    """Median us per step to fill every row's mask, and to advance every matcher by a token."""
    import llguidance
    import torch

    W = -(-V // 32)
    mask = torch.zeros((rows, W), dtype=torch.int32)
    ptr = mask.data_ptr()
    ex = llguidance.LLExecutor(threads) if mode == "pool" else None
    matchers = [compiled.deep_copy() for _ in range(rows)]
    rng = np.random.default_rng(seed)
    fills, advances = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if ex is None:
            for j, m in enumerate(matchers):
                m.unsafe_compute_mask_ptr(ptr + j * W * 4, W * 4)
        else:
            ex.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], ptr, W * 4, rows)
        fills.append(time.perf_counter() - t0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V]
        picks = np.where(bits, rng.standard_normal((rows, V)), -np.inf).argmax(1).tolist()
        going = []
        for m, t in zip(matchers, picks):
            if m.is_stopped():
                m.reset()  # (a finished record: start another)
            else:
                going.append((m, t))
        if not going:  # (every record just ended; consume_token_par refuses an empty batch)
            continue
        t0 = time.perf_counter()
        if ex is None:
            ok = [m.consume_token(t) for m, t in going]
        else:
            ok = ex.consume_token_par(going)
        advances.append((time.perf_counter() - t0) * rows / len(going))  # (per step of every row)
        for (m, _), good in zip(going, ok):
            if not good:
                m.reset()
    return 1e6 * statistics.median(fills), 1e6 * statistics.median(advances)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpe-vocab", type=int, default=0, help="train a byte-level BPE of this size (0: the tiny model's)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="pool sizes to try")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import llguidance
    import llguidance.hf

    from benchmarks.host_overhead import DEFAULT_SCHEMA

    if args.bpe_vocab:
        tok = bpe_tokenizer(args.bpe_vocab)
    else:
        from transformers import AutoTokenizer

        from drlora.models import resolve_model

        tok = AutoTokenizer.from_pretrained(str(resolve_model("tiny")))
    V = len(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(DEFAULT_SCHEMA),
                                                            defaults={"whitespace_flexible": True})
    compiled = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tok, n_vocab=V), grammar, log_level=0)
    results = []
    print(f"vocab {V}, {os.cpu_count()} cores; median us per step to fill every row's mask | to advance "
          "every matcher by a token")
    modes = [("inline", "in line", 1)] + [(f"pool{t}", f"pool({t})", t) for t in args.threads]
    print(f"{'rows':>5} " + " ".join(f"{label:>9}" for _, label, _ in modes) + " | "
          + " ".join(f"{label:>9}" for _, label, _ in modes))
    for n in args.rows:
        row = {"rows": n}
        for key, _, t in modes:
            row[f"{key}_us"], row[f"{key}_advance_us"] = step_times(compiled, V, n, "inline" if key == "inline" else "pool",
                                                                    t, args.steps, n)
        results.append(row)
        print(f"{n:>5} " + " ".join(f"{row[f'{k}_us']:9.1f}" for k, _, _ in modes) + " | "
              + " ".join(f"{row[f'{k}_advance_us']:9.1f}" for k, _, _ in modes))
    if args.out:
        meta = {"vocab": V, "bpe_trained": bool(args.bpe_vocab), "cpu_count": os.cpu_count(),
                "python": platform.python_version(), "llguidance": llguidance.__version__,
                "command": "grammar_fill.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        Path(args.out).write_text(json.dumps({"rows": results, "meta": meta}, indent=1))


if __name__ == "__main__":
    main()
