"""The sampling controls against independent references: transformers' logits processors
(RepetitionPenalty, NoBadWords, MinNewTokensLength, SequenceBias, PrefixConstrained, MinP,
Temperature, TopK, TopP) and the OpenAI formula for frequency / presence penalties, applied to
the very logits the engine computed, step by step, in a batch run with asynchronous scheduling
(so the penalties' and bad words' device-side state is exercised with tokens in flight)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from drlora_serve.logits_processors import apply_min_p
from drlora_serve.preprocess import bad_words_token_ids
from drlora_serve.types import InvalidRequestError, SamplingParams

from serve_helpers import PROMPTS, make_engine, run_all


@pytest.fixture(scope="module")
def engine(tiny_dir, tokenizer, adapters_dir):
    return make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_batched_tokens=64)


def capture(engine) -> dict:
    """Raw logits of every sampled row: (sequence key, position of the token it samples) -> (V,)."""
    rec = {}
    launch = engine.runner.launch

    def wrapped(batch):
        step = launch(batch)
        if step.sample_logits is not None:
            for i, s in enumerate(step.sample_seqs):
                rec[(s.key, s.num_tokens - 1)] = step.sample_logits[i].clone()
        return step

    engine.runner.launch = wrapped
    return rec


def run(engine, reqs: dict[str, tuple[list[int], SamplingParams, str | None]]):
    """Run the requests together; (outputs, raw logits, sequence keys)."""
    rec = capture(engine)
    keys = {}
    try:
        for rid, (toks, sp, adapter) in reqs.items():
            engine.add_request(rid, toks, sp, adapter)
            keys[rid] = engine.processor.requests[rid].key
        outs = run_all(engine)
    finally:
        del engine.runner.launch
    return outs, rec, keys


def reference_scores(raw: torch.Tensor, prompt: list[int], prev: list[int], p: SamplingParams,
                     stop_ids: list[int]) -> torch.Tensor:
    """vLLM's order: allowed_token_ids, bad words (prefixes matched on the output only), min_tokens,
    logit_bias, repetition penalty (prompt + output), frequency and presence (output)."""
    ids = torch.tensor([prompt + prev])
    s = raw.clone()[None]
    if p.allowed_token_ids is not None:
        s = PrefixConstrainedLogitsProcessor(lambda b, x: p.allowed_token_ids, 1)(ids, s)
    if p.bad_words_token_ids:
        s = NoBadWordsLogitsProcessor(p.bad_words_token_ids)(torch.tensor([[-1] + prev]), s)
    if p.min_tokens:
        s = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, stop_ids)(ids, s)
    if p.logit_bias:
        s = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias.items()})(ids, s)
    if p.repetition_penalty != 1:
        s = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, s)
    counts = torch.bincount(torch.tensor(prev, dtype=torch.long), minlength=s.shape[1]).float() if prev else \
        torch.zeros(s.shape[1])
    s = s - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return s[0]


def check_greedy(outs, rec, keys, reqs, eos):
    for rid, (prompt, p, _) in reqs.items():
        out = outs[rid].outputs[0].token_ids
        stop_ids = sorted(set(p.stop_token_ids) | {eos})  # what min_tokens forbids: eos even with ignore_eos (vLLM)
        for t, tok in enumerate(out):
            raw = rec[(keys[rid], len(prompt) + t)]
            ref = reference_scores(raw, prompt, out[:t], p, stop_ids)
            assert tok == int(torch.argmax(ref)), (rid, t, out)


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def test_greedy_controls_match_transformers(engine, tokenizer):
    prompts = [tokenizer.encode(PROMPTS[i]) for i in range(4)]
    plain_reqs = {f"plain{i}": (p, GREEDY, None) for i, p in enumerate(prompts)}
    plain = {k: o.outputs[0].token_ids for k, o in run(engine, plain_reqs)[0].items()}
    base = plain["plain0"]
    g = lambda **kw: dataclasses.replace(GREEDY, **kw)  # noqa: E731
    eos = tokenizer.eos_token_id
    cases = {
        "rep_up": (prompts[0], g(repetition_penalty=1.3), None),
        "rep_down": (prompts[1], g(repetition_penalty=0.7), "a"),
        "freq_pres": (prompts[1], g(frequency_penalty=1.5, presence_penalty=1.0), None),
        "neg_freq": (prompts[0], g(frequency_penalty=-1.0), None),
        "neg_freq_adapter": (prompts[3], g(frequency_penalty=-0.5), "b"),
        "bias": (prompts[0], g(logit_bias={base[0]: -5.0, base[1]: -3.0, 17: 2.5}), None),
        # a two-token word made of the plain output's 3rd and 4th tokens, and its 1st token alone
        "bad": (prompts[0], g(bad_words_token_ids=[base[2:4], [base[0]]]), None),
        "bad_adapter": (prompts[1], g(bad_words_token_ids=[plain["plain1"][1:4]]), None),
        "min_tokens": (prompts[2], g(min_tokens=6, ignore_eos=False, stop_token_ids=[18], logit_bias={eos: 9.0, 18: 8.0}),
                       "c"),
        "min_tokens_ignore_eos": (prompts[1], g(min_tokens=5, logit_bias={eos: 9.0}), None),
        "allowed": (prompts[3], g(allowed_token_ids=[5, 17, 18, 225, 300]), None),
        "all": (prompts[0], g(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2, logit_bias={33: 1.5},
                              bad_words_token_ids=[base[2:4]], min_tokens=3, ignore_eos=False,
                              allowed_token_ids=list(range(5, 400))), "a"),
    }
    outs, rec, keys = run(engine, cases)
    check_greedy(outs, rec, keys, cases, eos)
    got = {k: o.outputs[0].token_ids for k, o in outs.items()}
    # the controls did something (against the plain outputs of the same prompts and adapters)
    assert got["rep_up"] != base and got["bias"] != base and got["bad"] != base
    assert got["freq_pres"] != plain["plain1"] and got["neg_freq"] != base
    assert base[0] not in got["bad"] and all(got["bad"][i:i + 2] != base[2:4] for i in range(len(got["bad"])))
    mt = got["min_tokens"]
    assert len(mt) == 7 and mt[-1] in (eos, 18) and not set(mt[:6]) & {eos, 18}  # stops right after min_tokens
    assert set(got["allowed"]) <= {5, 17, 18, 225, 300}
    assert eos not in got["min_tokens_ignore_eos"][:5] and eos in got["min_tokens_ignore_eos"][5:]
    assert outs["min_tokens"].outputs[0].finish_reason == "stop"


def test_sampled_tokens_stay_in_reference_support(engine, tokenizer):
    """Sampled rows: every token is one the reference pipeline (controls, temperature, min_p,
    top-k, top-p, in vLLM's order) allows; min_p really narrows the support."""
    prompts = [tokenizer.encode(PROMPTS[i]) for i in range(3)]
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.95, min_p=0.2, repetition_penalty=1.2,
                        frequency_penalty=0.5, seed=7, ignore_eos=True)
    reqs = {f"s{i}": (p, dataclasses.replace(sp, seed=7 + i), [None, "a", "c"][i]) for i, p in enumerate(prompts)}
    outs, rec, keys = run(engine, reqs)
    narrowed = 0
    for rid, (prompt, p, _) in reqs.items():
        out = outs[rid].outputs[0].token_ids
        for t, tok in enumerate(out):
            s = reference_scores(rec[(keys[rid], len(prompt) + t)], prompt, out[:t], p, [])[None]
            ids = torch.tensor([prompt + out[:t]])
            for w in (TemperatureLogitsWarper(p.temperature), MinPLogitsWarper(p.min_p), TopKLogitsWarper(p.top_k),
                      TopPLogitsWarper(p.top_p)):
                s = w(ids, s)
            assert torch.isfinite(s[0, tok]), (rid, t)
            narrowed += int(torch.isfinite(s[0]).sum()) < p.top_k
    assert narrowed > 0


def test_min_p_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g) * 3
    min_p = torch.rand(16, generator=g) * 0.5
    min_p[0] = 0.0
    ours = apply_min_p(logits, min_p)
    for i in range(16):
        ref = MinPLogitsWarper(float(min_p[i]))(None, logits[i:i + 1].clone())[0]
        assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(ref)), i
    assert torch.isfinite(ours[0]).all()


def test_bad_words_tokenized_like_vllm(tokenizer):
    ids = bad_words_token_ids(tokenizer, ["fox", " lazy dog"])
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    assert enc("fox") in ids and enc("lazy dog") in ids
    # the spaced variant when it is a different first token of the same length
    spaced = enc(" fox")
    assert (spaced in ids) == (spaced[0] != enc("fox")[0] and len(spaced) == len(enc("fox")))


def test_bad_words_text_end_to_end(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[0])
    engine.add_request("bw0", toks, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    text = run_all(engine)["bw0"].outputs[0].text
    word = text.split()[1]
    engine.add_request("bw1", toks, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, bad_words=[word]))
    out = run_all(engine)["bw1"].outputs[0]
    assert word not in out.text.split() and out.text != text


@pytest.mark.parametrize("bad", [
    dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0), dict(min_p=1.5),
    dict(min_tokens=20, max_tokens=10), dict(logit_bias={10_000: 1.0}), dict(allowed_token_ids=[]),
    dict(allowed_token_ids=[5, 99_999]), dict(truncate_prompt_tokens=0), dict(logit_bias={3: float("nan")}),
])
def test_bad_values_refused(engine, bad):
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", [5, 6, 7], SamplingParams(**bad))
    assert "bad" not in engine.processor.requests


def test_truncate_prompt_tokens_keeps_the_last(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[3])
    engine.add_request("tr0", toks, SamplingParams(max_tokens=4, temperature=0, truncate_prompt_tokens=5))
    engine.add_request("tr1", toks[-5:], SamplingParams(max_tokens=4, temperature=0))
    outs = run_all(engine)
    assert outs["tr0"].prompt_token_ids == toks[-5:]
    assert outs["tr0"].outputs[0].token_ids == outs["tr1"].outputs[0].token_ids


def test_prompt_logprob_ranks(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[0])
    engine.add_request("pl", toks, SamplingParams(max_tokens=0, prompt_logprobs=3))
    plp = run_all(engine)["pl"].prompt_logprobs
    assert plp[0] is None and len(plp) == len(toks)
    for e in plp[1:]:
        better = sum(1 for t, v in e.top.items() if v > e.logprob and t != e.token_id)
        assert e.rank >= 1 + better
        if e.token_id in e.top:
            assert e.rank == 1 + sorted(e.top.values(), reverse=True).index(e.top[e.token_id])
        else:
            assert e.rank > 3


def test_min_tokens_defers_stop_strings_and_include_stop_str(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[0])
    k = 4
    # (min_tokens also keeps eos out of the first k tokens under ignore_eos: the base has it too)
    engine.add_request("ms0", toks, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, min_tokens=k))
    base = run_all(engine)["ms0"].outputs[0]
    head = len(tokenizer.decode(base.token_ids[:k]))
    stop = next(c for c in base.text[:head] if not c.isspace() and c in base.text[head:])
    assert stop in base.text[:head] and stop in base.text[head:]  # a hit before min_tokens and one after
    for include in (False, True):
        sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], min_tokens=k,
                            include_stop_str_in_output=include)
        engine.add_request("ms1", toks, sp)
        out = run_all(engine)["ms1"].outputs[0]
        cut = base.text.index(stop, head)
        assert out.text == base.text[:cut + (len(stop) if include else 0)] and out.finish_reason == "stop"


def test_include_stop_str_in_output_keeps_a_stop_tokens_text(engine, tokenizer):
    """vLLM: a stop token id adds its own text when include_stop_str_in_output is set (none
    otherwise), streamed (delta) and final alike."""
    toks = tokenizer.encode(PROMPTS[0])
    engine.add_request("st0", toks, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    base = run_all(engine)["st0"].outputs[0]
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)
    for include in (False, True):
        for kind in ("final", "delta"):
            sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id],
                                include_stop_str_in_output=include, output_kind=kind)
            engine.add_request("st1", toks, sp)
            pieces, final = [], None
            while engine.has_unfinished():
                for out in engine.step():
                    pieces.extend(o.text for o in out.outputs)
                    final = out if out.finished else final
            o = final.outputs[0]
            text = "".join(pieces) if kind == "delta" else o.text
            want = tokenizer.decode(base.token_ids[:first + (1 if include else 0)], skip_special_tokens=True)
            assert o.finish_reason == "stop" and text == want, (include, kind, text, want)
