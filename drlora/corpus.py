"""Synthetic text the project generates itself (no downloads): the tiny model's tokenizer is
trained on it, the pretrained tiny base (`scripts/pretrain_tiny.py`) learns from it, and the
demo tasks (`scripts/make_tasks.py`) draw on the same skills in formats this corpus never uses.

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
# Word classes for the templated half of the prose family (a subset of WORDS).
_NOUNS = ("river mountain city market garden window letter story music light shadow stone paper "
          "bread water fire wind cloud road bridge door house field teacher farmer doctor sailor "
          "painter child friend stranger king queen robot cat dog bird horse fish tree flower "
          "apple orange lemon honey").split()
_VERBS = "walks runs sings reads writes opens closes builds finds keeps gives takes sees hears".split()
_ADJS = "quiet bright dark old young small large quick slow warm cold green blue red golden".split()
_TIMES = "morning evening winter summer".split()
_PREPS = "in on at by with from into over under after before".split()
_ADVS = "always never often sometimes again".split()


def _number(rng: random.Random) -> int:
    """A non-negative integer of 1 to 3 digits, 2 digits most often."""
    digits = rng.choices((1, 2, 3), weights=(3, 6, 1))[0]
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def arithmetic(rng: random.Random) -> str:
    op = rng.choices("+-*", weights=(6, 3, 1))[0]
    if op == "*":  # products stay short: single-digit factors
        a, b = rng.randint(0, 9), rng.randint(0, 9)
    else:
        a, b = _number(rng), _number(rng)
    val = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {val}"


def _word(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(WORDS + NAMES)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def string_transform(rng: random.Random) -> str:
    # Letters are spaced out (one token each), so the transformations are learnable by a
    # tiny model; multi-letter BPE tokens would hide the spelling.
    word = _word(rng)[:7]
    kind = rng.choice(["reverse", "upper", "sort", "double", "first", "last", "length"])
    out = {
        "reverse": word[::-1],
        "upper": word.upper(),
        "sort": "".join(sorted(word)),
        "double": "".join(c + c for c in word),
        "first": word[0],
        "last": word[-1],
        "length": str(len(word)),
    }[kind]
    return f"{kind} {' '.join(word)} -> {' '.join(out)}"


def key_value(rng: random.Random) -> str:
    keys = rng.sample(NAMES, rng.randint(2, 4))
    vals = [rng.randint(10, 99) for _ in keys]
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
    # Several queries per line: more of the line's tokens need the lookup skill.
    qs = rng.sample(range(len(keys)), rng.randint(1, len(keys)))
    return f"{pairs}. " + " ".join(f"{keys[q]}? {vals[q]}" for q in qs)


def code_like(rng: random.Random) -> str:
    name = rng.choice(["f", "g", "h", "add", "scale", "step", "mix", "twice", "inc"])
    x, y = rng.sample("xyzabn", 2)
    k = rng.randint(1, 9)
    if rng.random() < 0.5:
        args = x
        body = rng.choice([f"{x} + {k}", f"{x} * {k}", f"{x} - {k}", f"{k} * {x} + 1",
                           f"max({x}, {k})", f"min({x}, {k})"])
    else:
        args = f"{x}, {y}"
        body = rng.choice([f"{x} + {y}", f"{x} * {k}", f"max({x}, {y})", f"{x} - 1",
                           f"{x} * {y}", f"{x} - {y} + {k}"])
    text = f"def {name}({args}):\n    return {body}\n"
    # Calls appear without their results: the demo "evaluate a call" task is not in here.
    r = rng.random()
    if r < 0.3:
        vals = ", ".join(str(rng.randint(0, 20)) for _ in args.split(", "))
        text += f"print({name}({vals}))\n"
    elif r < 0.5:
        text += f"{y if args == x else 'r'} = {name}({args})\n"
    return text


def prose(rng: random.Random) -> str:
    if rng.random() < 0.5:
        n = rng.randint(6, 14)
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."
    subj = rng.choice([f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}", rng.choice(NAMES)])
    obj = f"the {rng.choice(_NOUNS)}"
    s = f"{subj} {rng.choice(_ADVS)} {rng.choice(_VERBS)} {obj}"
    if rng.random() < 0.6:
        s += f" {rng.choice(_PREPS)} the {rng.choice(_TIMES + _NOUNS)}"
    return s.capitalize() + "."


FAMILIES: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": arithmetic,
    "string": string_transform,
    "kv": key_value,
    "code": code_like,
    "prose": prose,
}


def labelled_corpus(n_lines: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """n_lines (family, text) pairs, families uniformly mixed, deterministic from the seed."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    for _ in range(n_lines):
        fam = rng.choice(names)
        yield fam, FAMILIES[fam](rng)


def corpus(n_lines: int, seed: int = 0) -> Iterator[str]:
    """n_lines lines of mixed text, deterministic from the seed."""
    for _, text in labelled_corpus(n_lines, seed):
        yield text
