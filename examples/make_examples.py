"""Regenerate the example data sets (deterministic; drawn from drlora.corpus's families).

    python examples/make_examples.py

- arith.jsonl: 1000 prompt/completion records, "123 + 45 =" -> " 168" (a narrow task family:
  the tiny model routes it to a few experts, so DR-LoRA's ranks become visibly uneven);
- chat.jsonl: 200 chat records (key-value lookup questions) for the `messages` format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from drlora.corpus import arithmetic, key_value

HERE = Path(__file__).parent


def arith(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lhs, rhs = arithmetic(rng).split(" = ")
        out.append({"prompt": lhs + " =", "completion": " " + rhs})
    return out


def chat(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, a = key_value(rng).rsplit(" ", 1)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    write(HERE / "arith.jsonl", arith(1000, seed=1))
    write(HERE / "chat.jsonl", chat(200, seed=2))
