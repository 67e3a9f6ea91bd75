"""Structured outputs (llguidance) through the engine on the tiny model: JSON-schema outputs
parse and validate for many seeds, greedy and sampled; regex, choice and grammar outputs match;
a mixed batch (constrained, unconstrained, penalised, adapter rows, greedy and seeded) gives
every row what it gets alone; streamed (delta) text equals the final text; bad grammars are
refused up front; compiled grammars are cached by content."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest

from drlora_serve.types import InvalidRequestError, SamplingParams, StructuredOutputsParams

from serve_helpers import PROMPTS, make_engine, run_all

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "home": {"type": "object", "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                                  "y": {"type": "integer", "minimum": 0, "maximum": 999}},
                 "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "ok", "home"],
    "additionalProperties": False,
}


def so(**kw) -> StructuredOutputsParams:
    kw.setdefault("disable_any_whitespace", True)  # the tiny model loves spaces: keep JSON compact
    return StructuredOutputsParams(**kw)


@pytest.fixture(scope="module")
def engine(tiny_dir, tokenizer, adapters_dir):
    return make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_batched_tokens=64)


def test_json_schema_outputs_validate_for_many_seeds(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[0])
    c = so(json=SCHEMA)
    engine.add_request("js-greedy", toks, SamplingParams(max_tokens=150, temperature=0, structured_outputs=c))
    engine.add_request("js-sampled", toks, SamplingParams(max_tokens=150, temperature=1.0, seed=11, n=12,
                                                         structured_outputs=c), "a")
    engine.add_request("js-text", toks, SamplingParams(max_tokens=150, temperature=0.7, seed=3, n=4,
                                                      structured_outputs=so(json=json.dumps(SCHEMA))))
    outs = run_all(engine)
    texts = set()
    for rid in ("js-greedy", "js-sampled", "js-text"):
        for o in outs[rid].outputs:
            assert o.finish_reason == "stop", (rid, o.text)
            jsonschema.validate(json.loads(o.text), SCHEMA)
            texts.add(o.text)
    assert len(texts) > 8  # the seeds really sample different documents


def test_json_object_and_flexible_whitespace(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[1])
    engine.add_request("jo", toks, SamplingParams(max_tokens=60, temperature=0.8, seed=5, n=4,
                                                  structured_outputs=so(json_object=True)))
    # flexible whitespace (vLLM's default): the tiny model pads with spaces; what it wrote is a JSON prefix
    engine.add_request("flex", toks, SamplingParams(max_tokens=30, temperature=0, structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False})))
    outs = run_all(engine)
    for o in outs["jo"].outputs:
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            assert o.text.startswith("{")
    assert any(o.finish_reason == "stop" for o in outs["jo"].outputs)
    flex = outs["flex"].outputs[0]
    assert flex.text.startswith("{") and (flex.finish_reason == "length" or json.loads(flex.text))


@pytest.mark.parametrize("kind,value,check", [
    ("regex", r"[0-9]{3}-[a-z]{2,4}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ("choice", ["yes", "no", "maybe so"], lambda t: t in ("yes", "no", "maybe so")),
    ("grammar", 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/', lambda t: re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", t)),
    ("grammar", 'root ::= "A" [b-d] [b-d]? "!"', lambda t: re.fullmatch(r"A[b-d]{1,2}!", t)),  # GBNF
])
def test_regex_choice_grammar(engine, tokenizer, kind, value, check):
    sp = SamplingParams(max_tokens=40, temperature=1.0, seed=1, n=8, structured_outputs=so(**{kind: value}))
    engine.add_request("rc", tokenizer.encode(PROMPTS[2]), sp)
    outs = run_all(engine)["rc"].outputs
    for o in outs:
        if o.finish_reason == "stop":
            assert check(o.text), o.text
    assert sum(o.finish_reason == "stop" for o in outs) >= 6


def test_many_choices_and_special_characters(engine, tokenizer):
    """A choice list past llguidance's 2,000 items per grammar row (served as one regex lexeme),
    with strings that hold regex syntax: every output is one of the strings."""
    choices = [f"w{i}" for i in range(2500)] + ["a.b", "x|y", "(z)", "[q]", "1+1", "~-#&", "ü^$"]
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=4, n=6, structured_outputs=so(choice=choices))
    engine.add_request("many", tokenizer.encode(PROMPTS[1]), sp)
    out = run_all(engine)["many"]
    assert out.error is None
    for o in out.outputs:
        assert o.finish_reason == "stop" and o.text in choices, o.text
    engine.add_request("special", tokenizer.encode(PROMPTS[1]), SamplingParams(
        max_tokens=12, temperature=0, structured_outputs=so(choice=["a.b", "x|y", "(z)"])))
    assert run_all(engine)["special"].outputs[0].text in ("a.b", "x|y", "(z)")


def mixed_requests(tokenizer):
    t = [tokenizer.encode(p) for p in PROMPTS]
    g = SamplingParams(max_tokens=120, temperature=0)
    s = SamplingParams(max_tokens=120, temperature=0.9, seed=21)
    return {
        "json-greedy": (t[0], dataclasses.replace(g, structured_outputs=so(json=SCHEMA)), None),
        "json-seeded-a": (t[1], dataclasses.replace(s, structured_outputs=so(json=SCHEMA), n=2), "a"),
        "regex-b": (t[2], dataclasses.replace(s, seed=5, structured_outputs=so(regex=r"[a-z]{2,6}( [a-z]{2,6}){2}")), "b"),
        "choice": (t[3], dataclasses.replace(g, structured_outputs=so(choice=["alpha", "beta", "gamma"])), "c"),
        "plain": (t[0], dataclasses.replace(g, ignore_eos=True, max_tokens=20), None),
        "plain-seeded-c": (t[4], dataclasses.replace(s, ignore_eos=True, max_tokens=20), "c"),
        "penalised": (t[1], dataclasses.replace(g, ignore_eos=True, max_tokens=20, repetition_penalty=1.4,
                                                frequency_penalty=0.5, logit_bias={18: 2.0}), "a"),
        "penalised-json": (t[2], dataclasses.replace(s, structured_outputs=so(json=SCHEMA), presence_penalty=0.5,
                                                     bad_words_token_ids=[[21, 22]], min_p=0.05), None),
        "min-tokens-json": (t[3], dataclasses.replace(g, structured_outputs=so(choice=["no"]), min_tokens=5), "b"),
    }


def summary(out):
    return [(o.index, o.text, tuple(o.token_ids), o.finish_reason) for o in out.outputs]


def test_mixed_batch_rows_equal_alone(engine, tokenizer):
    reqs = mixed_requests(tokenizer)
    alone = {}
    for rid, (toks, sp, adapter) in reqs.items():
        engine.add_request(rid, toks, sp, adapter)
        alone[rid] = summary(run_all(engine)[rid])
    for rid, (toks, sp, adapter) in reqs.items():
        engine.add_request(rid, toks, sp, adapter)
    together = {rid: summary(o) for rid, o in run_all(engine).items()}
    assert together == alone
    for rid in ("json-greedy", "json-seeded-a", "penalised-json"):
        for _, text, _, reason in together[rid]:
            assert reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA)
    # the grammar wins over min_tokens: "no" is complete, its end cannot be put off
    assert together["min-tokens-json"][0][1] == "no" and together["min-tokens-json"][0][3] == "stop"


def test_streamed_text_equals_final(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[0])
    sp = SamplingParams(max_tokens=100, temperature=0.8, seed=4, n=3, structured_outputs=so(json=SCHEMA),
                        stop=["qqq"])
    engine.add_request("final", toks, dataclasses.replace(sp, output_kind="final"))
    engine.add_request("delta", toks, dataclasses.replace(sp, output_kind="delta"))
    pieces: dict[int, list[str]] = {}
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "delta":
                for o in out.outputs:
                    pieces.setdefault(o.index, []).append(o.text)
            elif out.finished:
                final = out
    assert final is not None
    for o in final.outputs:
        assert "".join(pieces[o.index]) == o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_ignore_eos_after_the_grammar_ends(engine, tokenizer):
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, structured_outputs=so(choice=["done"]))
    engine.add_request("ie", tokenizer.encode(PROMPTS[0]), sp)
    o = run_all(engine)["ie"].outputs[0]
    assert o.text == "done" and o.finish_reason == "length" and len(o.token_ids) == 30
    assert set(o.token_ids[-20:]) == {tokenizer.eos_token_id}  # only the end is allowed once complete


@pytest.mark.parametrize("bad", [
    dict(json='{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}'),
    dict(json="{not json"),
    dict(json='["a list"]'),
    dict(regex="a(b"),
    dict(grammar="start: (("),
    dict(choice=[]),
    dict(regex="a", choice=["a"]),
    # no text at all satisfies these: refused, rather than ending at once with ""
    dict(regex=r"[^\s\S]"),
    dict(grammar='start: start "a"'),
    dict(grammar='root ::= root "a"'),
    dict(json={"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    dict(json="[" * 5000 + "]" * 5000),  # past json's recursion limit
])
def test_bad_grammars_refused_up_front(engine, bad):
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad-g", [5, 6], SamplingParams(structured_outputs=StructuredOutputsParams(**bad)))
    assert "bad-g" not in engine.processor.requests and not engine.has_unfinished()


def test_grammars_compiled_once_per_content(engine, tokenizer):
    cache = engine.core.grammars._cache
    schema = {"type": "object", "properties": {"k": {"enum": ["v1", "v2"]}}, "required": ["k"],
              "additionalProperties": False}
    for i, js in enumerate([schema, json.dumps(schema, indent=2), json.dumps(schema)]):  # same content
        engine.add_request(f"cc{i}", tokenizer.encode(PROMPTS[0]),
                           SamplingParams(max_tokens=20, temperature=0, structured_outputs=so(json=js)))
    futures = {id(r.grammar) for r in engine.core._compiling}
    outs = run_all(engine)
    assert len(futures) == 1 and len({o.outputs[0].text for o in outs.values()}) == 1
    assert json.loads(outs["cc0"].outputs[0].text)["k"] in ("v1", "v2")
    assert len(cache.d) >= 1


def test_async_scheduling_changes_no_constrained_output(tiny_dir, tokenizer, adapters_dir):
    reqs = mixed_requests(tokenizer)
    results = {}
    for overlap in (True, False):
        eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), async_scheduling=overlap,
                          max_num_batched_tokens=32, num_kv_blocks=64, block_size=4)  # preemption too
        for rid, (toks, sp, adapter) in reqs.items():
            eng.add_request(rid, toks, sp, adapter)
        results[overlap] = {rid: summary(o) for rid, o in run_all(eng).items()}
        assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
        assert eng.stats().num_preemptions_total > 0
    assert results[True] == results[False]


def test_masks_filled_in_threads_equal_in_line(tiny_dir, tokenizer, adapters_dir, monkeypatch):
    """LLExecutor's threads (hosts with cores to spare) and the calling thread (small batches or
    one thread, as on the 2-core CI machine) fill the same masks and advance the matchers alike:
    the same outputs."""
    import drlora_serve.structured as st

    monkeypatch.setattr(st, "PARALLEL_MIN_ROWS", 1)
    reqs = mixed_requests(tokenizer)
    results = {}
    for threads in (1, 2):
        monkeypatch.setenv(st.THREADS_ENV, str(threads))
        eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_batched_tokens=64)
        for rid, (toks, sp, adapter) in reqs.items():
            eng.add_request(rid, toks, sp, adapter)
        results[threads] = {rid: summary(o) for rid, o in run_all(eng).items()}
        assert eng.core.grammars.threads == threads
        assert (eng.core.grammars._executor is not None) == (threads > 1)
    assert results[1] == results[2]


def test_tokenizer_larger_than_the_model_vocab(tiny_dir, tokenizer):
    """A tokenizer with more tokens than the model's vocabulary (added tokens the embeddings do
    not cover): llguidance's masks then have more words than the logits need, and the engine
    sizes its mask buffers by them (tokens past the logits are never sampled)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])
    assert len(tok) > tokenizer.vocab_size + 64
    eng = make_engine(tiny_dir, tok)
    eng.add_request("big-vocab", tokenizer.encode(PROMPTS[0]),
                    SamplingParams(max_tokens=150, temperature=0, structured_outputs=so(json=SCHEMA)))
    o = run_all(eng)["big-vocab"].outputs[0]
    assert o.finish_reason == "stop", o.text
    jsonschema.validate(json.loads(o.text), SCHEMA)


@pytest.mark.parametrize("threads", [1, 2])
def test_no_allowed_token_left_fails_that_request_only(tiny_dir, tokenizer, threads, monkeypatch):
    """allowed_token_ids that exclude every token the grammar allows: the sampled token is
    refused by the grammar and that request fails with an error that says why (its sequence
    ends with "abort", without its token); the other constrained rows of the batch go on
    (matchers advanced in the calling thread and in LLExecutor's threads)."""
    import drlora_serve.structured as st

    monkeypatch.setattr(st, "PARALLEL_MIN_ROWS", 1)
    monkeypatch.setenv(st.THREADS_ENV, str(threads))
    eng = make_engine(tiny_dir, tokenizer)
    outside = tokenizer.encode("zzz", add_special_tokens=False)[0]  # not a prefix of "yes" or "no"
    assert not any(tokenizer.decode([outside]).startswith(c[:1]) for c in ("y", "n", "yes", "no"))
    g = SamplingParams(max_tokens=20, temperature=0)
    prompt = tokenizer.encode(PROMPTS[0])
    eng.add_request("starved", prompt, dataclasses.replace(
        g, structured_outputs=so(choice=["yes", "no"]), allowed_token_ids=[outside]))
    eng.add_request("fed", prompt, dataclasses.replace(g, structured_outputs=so(json=SCHEMA), max_tokens=150))
    outs = run_all(eng)
    starved = outs["starved"].outputs[0]
    assert starved.finish_reason == "abort" and starved.token_ids == []
    err = outs["starved"].error
    assert isinstance(err, InvalidRequestError) and "allowed_token_ids" in str(err), err
    assert outs["fed"].error is None
    fed = outs["fed"].outputs[0]
    assert fed.finish_reason == "stop"
    jsonschema.validate(json.loads(fed.text), SCHEMA)
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
