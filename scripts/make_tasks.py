"""Generate the demo fine-tuning tasks in examples/ (deterministic from a seed).

Each task asks for a skill the tiny base learned in pretraining (drlora/corpus.py) in a
format the pretraining corpus never uses, so the base cannot do it zero-shot and a LoRA has
to learn the mapping. Records are {"prompt", "completion"}: the prompt ends with a
punctuation character and no space, the completion starts with a letter or digit and has no
surrounding whitespace, so tokenize(prompt + completion) == tokenize(prompt) +
tokenize(completion) (checked below) and scoring is plain exact match of the greedy
continuation (up to eos, stripped) against the completion.

    python scripts/make_tasks.py            # writes examples/<task>.{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drlora.corpus import NAMES, corpus

ROOT = Path(__file__).resolve().parent.parent


def plus(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition with the word 'plus' (the corpus writes 'a + b = c')."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} plus {b}:", str(a + b)


def flip(rng: random.Random) -> tuple[str, str]:
    """Reverse 3-5 spaced letters, asked with 'flip' (the corpus says 'reverse w o r d -> ...')."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    return f"flip {' '.join(word)}:", " ".join(word[::-1])


def caps(rng: random.Random) -> tuple[str, str]:
    """Upper-case 3-5 spaced letters, asked with 'caps' (the corpus says 'upper w o r d -> ...')."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    return f"caps {' '.join(word)}:", " ".join(word.upper())


def lookup(rng: random.Random) -> tuple[str, str]:
    """Key-value lookup as 'k:v' pairs and a 'get k:' query (the corpus: 'k=v, ... k? v')."""
    keys = rng.sample(NAMES, rng.randint(3, 4))
    vals = [rng.randint(10, 99) for _ in keys]
    q = rng.randrange(len(keys))
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, vals))
    return f"{pairs}. get {keys[q]}:", str(vals[q])


def calls(rng: random.Random) -> tuple[str, str]:
    """Evaluate a one-line function at an argument (the corpus defines functions, never
    shows a call's value)."""
    name, var = rng.choice("fgh"), rng.choice("xyn")
    op, k = rng.choice("+-*"), rng.randint(1, 9)
    x = rng.randint(k, 30) if op == "-" else rng.randint(0, 15 if op == "*" else 30)
    val = x + k if op == "+" else x - k if op == "-" else x * k
    return f"def {name}({var}):\n    return {var} {op} {k}\n{name}({x})=", str(val)


def calls_key(prompt: str) -> str:
    """The computation a calls prompt asks for, whatever the function and argument names:
    train and test never share one."""
    return re.sub(r"\b[fgh]\b", "F", re.sub(r"\b[xyn]\b", "V", prompt))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "plus": plus, "flip": flip, "lookup": lookup, "calls": calls, "caps": caps,
}
# What must differ between train and test (default: the prompt).
KEYS: dict[str, Callable[[str], str]] = {"calls": calls_key}
# Substrings of each task's format that must not occur in the pretraining corpus.
NOT_IN_CORPUS = {"plus": " plus ", "flip": "flip ", "lookup": ". get ", "calls": ")=", "caps": "caps "}


@dataclass(frozen=True)
class TaskConfig:
    seed: int = 1234
    n_train: int = 2000
    n_test: int = 200
    out: str = str(ROOT / "examples")


def make(gen: Callable[[random.Random], tuple[str, str]], key: Callable[[str], str],
         cfg: TaskConfig, salt: int) -> tuple[list[dict], list[dict]]:
    """Test records first (distinct keys), then distinct train prompts whose key is not a
    test key: no test item is seen in training."""
    rng = random.Random(cfg.seed * 100 + salt)
    test: dict[str, tuple[str, str]] = {}
    while len(test) < cfg.n_test:
        p, c = gen(rng)
        test.setdefault(key(p), (p, c))
    train: list[dict] = []
    seen = set()
    while len(train) < cfg.n_train:
        p, c = gen(rng)
        if p not in seen and key(p) not in test:
            seen.add(p)
            train.append({"prompt": p, "completion": c})
    return train, [{"prompt": p, "completion": c} for p, c in test.values()]


def tokenizer():
    """The tiny model's tokenizer (deterministic from the corpus, as the checkpoint's)."""
    from transformers import AutoTokenizer

    from drlora.tiny import ASSET_DIR, TinySpec, train_tokenizer

    if (ASSET_DIR / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(ASSET_DIR)
    tmp = Path(tempfile.mkdtemp(prefix="drlora-tok-"))
    train_tokenizer(TinySpec(), tmp)
    return AutoTokenizer.from_pretrained(tmp)


def check(task: str, records: list[dict], tok, corpus_text: str) -> None:
    assert NOT_IN_CORPUS[task] not in corpus_text, f"{task}: format occurs in the corpus"
    for r in records:
        p, c = r["prompt"], r["completion"]
        assert p == p.rstrip() and c == c.strip() and c[0].isalnum(), r
        ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        assert ids(p + c) == ids(p) + ids(c), f"{task}: token boundary differs: {r}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=TaskConfig.out)
    cfg = TaskConfig(out=ap.parse_args(argv).out)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, corpus_text = tokenizer(), "\n".join(corpus(50_000, seed=1))
    for salt, (name, gen) in enumerate(TASKS.items()):
        train, test = make(gen, KEYS.get(name, str), cfg, salt)
        for split, recs in (("train", train), ("test", test)):
            check(name, recs, tok, corpus_text)
            path = out / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(recs)} records")


if __name__ == "__main__":
    main()
