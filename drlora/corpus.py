"""Synthetic text the project generates itself (no downloads): the tiny model's tokenizer is
trained on it, and the demo tasks draw from the same families.

Families: arithmetic, string transformations, key-value lookup, code-like and prose-like
text. Every generator is a pure function of a `random.Random`, so a seed fixes the corpus.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator

WORDS = (
    "the a an of to in on at by for with from into over under after before while river "
    "mountain city market garden window letter story music winter summer morning evening "
    "light shadow stone paper bread water fire wind cloud road bridge door house field "
    "teacher farmer doctor sailor painter child friend stranger king queen robot cat dog "
    "bird horse fish tree flower apple orange lemon honey salt sugar coffee tea "
    "walks runs sings reads writes opens closes builds finds keeps gives takes sees hears "
    "quiet bright dark old young small large quick slow warm cold green blue red golden "
    "and but or so because when where if then again always never often sometimes"
).split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent".split()


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    val = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {val}"


def string_transform(rng: random.Random) -> str:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    kind = rng.choice(["reverse", "upper", "sort", "double"])
    out = {
        "reverse": word[::-1],
        "upper": word.upper(),
        "sort": "".join(sorted(word)),
        "double": "".join(c + c for c in word),
    }[kind]
    return f"{kind} {word} -> {out}"


def key_value(rng: random.Random) -> str:
    keys = rng.sample(NAMES, 3)
    vals = [rng.randint(10, 99) for _ in keys]
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
    q = rng.randrange(3)
    return f"{pairs}. {keys[q]}? {vals[q]}"


def code_like(rng: random.Random) -> str:
    name = rng.choice(["f", "g", "add", "scale", "step", "mix"])
    x, y = rng.choice("xyzabn"), rng.choice("xyzabn")
    body = rng.choice([f"{x} + {y}", f"{x} * {rng.randint(2, 9)}", f"max({x}, {y})", f"{x} - 1"])
    return f"def {name}({x}, {y}):\n    return {body}\n"


def prose(rng: random.Random) -> str:
    n = rng.randint(6, 14)
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


FAMILIES: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": arithmetic,
    "string": string_transform,
    "kv": key_value,
    "code": code_like,
    "prose": prose,
}


def corpus(n_lines: int, seed: int = 0) -> Iterator[str]:
    """n_lines lines of mixed text, deterministic from the seed."""
    rng = random.Random(seed)
    gens = list(FAMILIES.values())
    for _ in range(n_lines):
        yield rng.choice(gens)(rng)
