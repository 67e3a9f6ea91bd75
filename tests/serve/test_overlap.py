"""Asynchronous scheduling (step N+1 scheduled and launched before step N's tokens are read)
changes no output: the same mixed workload, with and without it, gives identical tokens,
text, logprobs and finish reasons, with preemption, prefix caching, stop strings and tokens,
eos, n > 1, seeds, prompt logprobs, adapters, penalties, logit_bias, min_p, min_tokens,
bad words, allowed_token_ids and structured outputs."""

from __future__ import annotations

import random

import pytest

from drlora_serve.types import SamplingParams, StructuredOutputsParams

from serve_helpers import PROMPTS, make_engine, run_all


def workload(tokenizer, seed: int):
    rng = random.Random(seed)
    reqs = []
    for i in range(24):
        text = PROMPTS[i % len(PROMPTS)] + " " + PROMPTS[rng.randrange(len(PROMPTS))]
        toks = tokenizer.encode(text)[:rng.randint(1, 40)]
        greedy = rng.random() < 0.5
        sp = SamplingParams(max_tokens=rng.randint(0, 14), temperature=0 if greedy else 0.9,
                            top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([-1, 20]),
                            seed=None if greedy else 1000 + i, n=rng.choice([1, 1, 2]),
                            logprobs=rng.choice([None, 0, 3]), prompt_logprobs=rng.choice([None, None, 2]),
                            stop=rng.choice([[], [" the"], ["e", "qqq"]]),
                            stop_token_ids=rng.choice([[], [rng.randrange(5, 200)]]),
                            ignore_eos=rng.random() < 0.7)
        if rng.random() < 0.6:  # the logits controls, some at a time
            sp.repetition_penalty = rng.choice([1.0, 1.3, 0.8])
            sp.frequency_penalty = rng.choice([0.0, 0.7, -0.4])
            sp.presence_penalty = rng.choice([0.0, 0.5])
            sp.min_p = rng.choice([0.0, 0.1])
            sp.logit_bias = rng.choice([None, {18: 3.0, 225: -2.0}])
            sp.bad_words_token_ids = rng.choice([None, [[225, 21]], [[18], [12, 82, 13]]])
            sp.min_tokens = min(sp.max_tokens, rng.choice([0, 0, 4]))
            sp.allowed_token_ids = rng.choice([None, None, list(range(5, 300))])
        elif rng.random() < 0.4:
            sp.structured_outputs = StructuredOutputsParams(
                **rng.choice([{"regex": "[a-z]{1,5}( [0-9]{1,3}){1,3}"}, {"choice": ["one", "two three"]},
                              {"json": {"type": "object", "properties": {"a": {"enum": [1, 2, 3]}}, "required": ["a"],
                                        "additionalProperties": False}}]), disable_any_whitespace=True)
        reqs.append((f"w{i}", toks, sp, rng.choice([None, "a", "b", "c"])))
    return reqs


def summary(out):
    """(exact part, logprobs): a step's batch changes float rounding, so logprobs are compared
    with a tolerance; tokens, text and finish reasons exactly."""
    exact = [(o.index, o.text, tuple(o.token_ids), o.finish_reason,
              tuple((lp.token_id, tuple(sorted(lp.top))) for lp in o.logprobs or [])) for o in out.outputs]
    lps = [lp.logprob for o in out.outputs for lp in o.logprobs or []]
    plp = out.prompt_logprobs or []
    exact.append(tuple(None if p is None else p.token_id for p in plp))
    lps += [p.logprob for p in plp if p is not None]
    return exact, lps


@pytest.mark.parametrize("small", [False, True], ids=["roomy", "preempting"])
def test_async_scheduling_changes_nothing(tiny_dir, tokenizer, adapters_dir, small):
    kw = dict(adapters_dir=str(adapters_dir), max_num_batched_tokens=32)
    if small:  # blocks so few that sequences are preempted and recomputed
        kw.update(num_kv_blocks=16, block_size=4)
    results = {}
    for overlap in (True, False):
        eng = make_engine(tiny_dir, tokenizer, async_scheduling=overlap, **kw)
        for rid, toks, sp, name in workload(tokenizer, 7):
            eng.add_request(rid, toks, sp, name)
        results[overlap] = {rid: summary(o) for rid, o in run_all(eng).items()}
        assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
        assert not eng.scheduler.running and eng.scheduler.num_waiting == 0
        if small:
            assert eng.stats().num_preemptions_total > 0
    assert {k: v[0] for k, v in results[True].items()} == {k: v[0] for k, v in results[False].items()}
    for k, (_, lps) in results[True].items():
        assert lps == pytest.approx(results[False][k][1], abs=1e-3), k
    reasons = {o[3] for r in results[True].values() for o in r[0][:-1]}
    assert {"stop", "length"} <= reasons  # the workload exercises both
