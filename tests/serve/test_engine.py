"""Engine behaviour: continuous batching, preemption, prefix caching, hot load / replace,
no leaked blocks, seeds, stop strings, logprobs, n > 1, prompt scoring, compaction, bad adapters."""

from __future__ import annotations

import random

import pytest

from drlora_serve.types import AdapterNotFoundError, InvalidRequestError, SamplingParams

from serve_helpers import PROMPTS, make_adapter, make_engine, run_all

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_dir, tokenizer, adapters_dir):
    return make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_batched_tokens=48)


def requests(tokenizer):
    names = [None, "a", "b", "c", "a", None]
    return [(f"q{i}", tokenizer.encode(PROMPTS[i % len(PROMPTS)]), names[i]) for i in range(len(names))]


def one_at_a_time(engine, reqs, params=GREEDY):
    out = {}
    for rid, toks, name in reqs:
        engine.add_request(rid + "-solo", toks, params, name)
        out[rid] = run_all(engine)[rid + "-solo"].outputs[0].token_ids
    return out


def together(engine, reqs, params=GREEDY):
    for rid, toks, name in reqs:
        engine.add_request(rid, toks, params, name)
    return {rid: o.outputs[0].token_ids for rid, o in run_all(engine).items()}


def test_batching_and_preemption_change_nothing(engine, tiny_dir, tokenizer, adapters_dir):
    reqs = requests(tokenizer)
    solo = one_at_a_time(engine, reqs)
    assert together(engine, reqs) == solo
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # all freed (cached ones are free)
    # a cache so small that sequences get preempted and recomputed; no prefix caching either
    small = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), num_kv_blocks=24, block_size=4,
                        max_num_batched_tokens=16, enable_prefix_caching=False)
    assert together(small, reqs) == solo
    assert small.stats().num_preemptions_total > 0
    assert small.blocks.num_free_blocks == small.blocks.num_blocks


def test_prefix_cache_hits_and_adapter_identity(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[3])
    counted = engine.stats().prompt_tokens_total
    first = together(engine, [("p1", toks, "a")])
    hits = engine.blocks.num_cache_hits
    assert together(engine, [("p2", toks, "a")]) == {"p2": first["p1"]}
    assert engine.blocks.num_cache_hits > hits  # same prompt, same adapter: reused
    together(engine, [("p1tok", toks[:1], None)])
    # vLLM's prompt_tokens counts whole prompts, cached tokens and one-token prompts included
    assert engine.stats().prompt_tokens_total - counted == 2 * len(toks) + 1
    hits = engine.blocks.num_cache_hits
    together(engine, [("p3", toks, "b")])
    assert engine.blocks.num_cache_hits == hits  # another adapter never reuses a's KV


def test_num_cached_tokens_per_request(tiny_dir, tokenizer, adapters_dir):
    """RequestOutput.num_cached_tokens (vLLM's): prompt tokens served by the prefix cache when
    the request's first sequence was scheduled, whole blocks only; 0 without hits; the cache is
    keyed by the adapter too."""
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), block_size=4)
    prompt = (tokenizer.encode(" ".join(PROMPTS)) * 2)[:22]
    assert len(prompt) == 22
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    def cached(rid, toks, adapter=None, params=sp):
        eng.add_request(rid, toks, params, adapter)
        return run_all(eng)[rid].num_cached_tokens

    assert cached("first", prompt) == 0
    assert cached("shared", prompt[:12] + [t + 1 for t in prompt[12:]]) == 12  # 3 whole blocks in common
    assert cached("other-adapter", prompt, "a") == 0  # the base's blocks are never an adapter's
    assert cached("again", prompt, "a") == 20  # (22 - 1) // 4 blocks: one token is always computed
    assert cached("n2", prompt, params=SamplingParams(n=2, max_tokens=3, temperature=0, ignore_eos=True)) == 20
    assert cached("score-only", prompt, params=SamplingParams(max_tokens=0)) == 20
    # streamed outputs carry it from the first token on
    eng.add_request("delta", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                    output_kind="delta"))
    seen = [o.num_cached_tokens for _ in range(50) if eng.has_unfinished() for o in eng.step()]
    assert seen and all(n == 20 for n in seen)


def test_num_cached_tokens_is_the_first_schedulings(tiny_dir, tokenizer):
    """A sequence preempted and recomputed may hit its own blocks when readmitted; the request
    still reports its first scheduling's hits (vLLM's), here none: distinct prompts."""
    eng = make_engine(tiny_dir, tokenizer, num_kv_blocks=32, block_size=4, max_num_batched_tokens=12)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i in range(4):  # prompts prefilled in chunks: r2 is preempted before its first token, readmitted with hits
        eng.add_request(f"r{i}", [100 + 50 * i + j for j in range(40)], sp)
    outs = run_all(eng)
    assert eng.stats().num_preemptions_total > 0 and eng.blocks.num_cache_hits > 0  # readmissions hit
    assert {o.num_cached_tokens for o in outs.values()} == {0}


def test_prefix_cache_chain_hash_fields_never_alias():
    """SHA-256 over fixed-width fields (Python's hash() of the chain was collidable): each of
    parent, adapter and tokens changes the hash, and no field's bytes can pass for another's."""
    from drlora_serve.block_manager import chain_hash
    h = chain_hash(None, None, [1, 2, 3, 4])
    assert len(h) == 32 and h == chain_hash(None, None, [1, 2, 3, 4])
    variants = [chain_hash(None, 0, [1, 2, 3, 4]), chain_hash(None, -1, [1, 2, 3, 4]), chain_hash(h, None, [1, 2, 3, 4]),
                chain_hash(None, None, [1, 2, 3, 5]), chain_hash(None, None, [1, 2, 3, 4 + 2**32]),
                chain_hash(None, None, [1, 2, 3])]
    assert len({h, *variants}) == 1 + len(variants)


def test_no_block_leak_after_random_requests(engine, tokenizer):
    rng = random.Random(0)
    names = [None, "a", "b", "c"]
    live, n_done = [], 0
    for i in range(200):
        toks = [rng.randrange(5, len(tokenizer)) for _ in range(rng.randint(1, 40))]
        sp = SamplingParams(max_tokens=rng.randint(0, 6), temperature=rng.choice([0, 1.0]), n=rng.choice([1, 1, 2]),
                            seed=rng.choice([None, i]), logprobs=rng.choice([None, 2]),
                            prompt_logprobs=rng.choice([None, None, 1]))
        engine.add_request(f"rnd{i}", toks, sp, rng.choice(names))
        live.append(f"rnd{i}")
        if rng.random() < 0.5:
            for out in engine.step():
                n_done += out.finished
        if rng.random() < 0.15:
            engine.abort(rng.choice(live))
    run_all(engine)
    b = engine.blocks
    assert b.num_free_blocks == b.num_blocks
    assert all(blk.ref_count == 0 for blk in b.blocks)
    assert not engine.scheduler.running and engine.scheduler.num_waiting == 0
    assert all(v.active == 0 and v.refs == 0 for v in engine.pool.versions)


def test_seeds_reproducible_whatever_the_batch(engine, tokenizer):
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    toks = tokenizer.encode(PROMPTS[1])
    alone = together(engine, [("s0", toks, "a")], sp)["s0"]
    others = [(f"o{i}", tokenizer.encode(PROMPTS[i]), None) for i in range(4)]
    mixed = together(engine, others + [("s1", toks, "a")], SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
    both = together(engine, [("s2", toks, "a")], sp)
    assert both["s2"] == alone
    engine.add_request("s3", toks, sp, "a")
    for rid, t, name in others:
        engine.add_request(rid + "x", t, SamplingParams(max_tokens=8, temperature=1.0), name)
    assert run_all(engine)["s3"].outputs[0].token_ids == alone
    assert mixed  # unseeded ones just run


def test_stop_strings_tokens_and_n(engine, tokenizer):
    toks = tokenizer.encode(PROMPTS[0])
    full = engine_text = None
    engine.add_request("t0", toks, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    full = run_all(engine)["t0"].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12 and full.stop_reason is None
    engine_text = full.text
    assert engine_text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = engine_text[len(engine_text) // 2:len(engine_text) // 2 + 2]
    if stop.strip():
        engine.add_request("t1", toks, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
        out = run_all(engine)["t1"].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop  # vLLM's stop_reason: the string
        assert out.text == engine_text[:engine_text.index(stop)]
    # a stop token id: included in token ids, finish "stop"
    engine.add_request("t2", toks, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[full.token_ids[3]]))
    out = run_all(engine)["t2"].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[3]) + 1]
    assert out.stop_reason == full.token_ids[3]  # ... or the token id
    # n > 1: independent sequences over one prompt
    engine.add_request("t3", toks, SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=5))
    out = run_all(engine)["t3"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # max_tokens=0: prompt scoring only
    engine.add_request("t4", toks, SamplingParams(max_tokens=0, prompt_logprobs=2))
    out = run_all(engine)["t4"]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == len(toks) and out.prompt_logprobs[0] is None
    assert all(len(p.top) == 2 for p in out.prompt_logprobs[1:])


def test_prompt_scoring_finishes_when_a_chunk_stops_one_token_short(engine, tiny_dir, tokenizer):
    """A request that samples nothing (max_tokens 0, or a prompt that fills the context) whose
    prefill chunk ends one token before its prompt's end used to be scheduled never again."""
    toks = tokenizer.encode(PROMPTS[2])[:8]
    assert len(toks) == 8
    engine.add_request("whole", toks, SamplingParams(max_tokens=0, prompt_logprobs=1))
    whole = run_all(engine)["whole"]
    short = make_engine(tiny_dir, tokenizer, max_num_batched_tokens=7, enable_prefix_caching=False, max_model_len=8)
    short.add_request("chunked", toks, SamplingParams(max_tokens=0, prompt_logprobs=1))
    short.add_request("fills", toks, SamplingParams(max_tokens=0))  # what max_tokens=None resolves to here
    done = run_all(short, max_steps=50)
    got = done["chunked"]
    assert got.outputs[0].finish_reason == "length" and got.outputs[0].token_ids == []
    assert [p and p.logprob for p in got.prompt_logprobs] == pytest.approx([p and p.logprob for p in whole.prompt_logprobs],
                                                                           abs=1e-5)
    assert done["fills"].outputs[0].token_ids == [] and done["fills"].outputs[0].finish_reason == "length"
    assert short.blocks.num_free_blocks == short.blocks.num_blocks


def test_tiny_positive_temperature_is_raised_as_vllm_does(engine, tokenizer):
    """logits / 1e-44 overflows to inf (NaN probabilities, arbitrary tokens): vLLM raises any
    temperature in (0, 1e-2) to 1e-2, and so does validate()."""
    sp = SamplingParams(temperature=1e-44)
    sp.validate()
    assert sp.temperature == 1e-2
    toks = tokenizer.encode(PROMPTS[0])
    outs = {}
    for t in (1e-44, 1e-2):
        engine.add_request(f"temp{t}", toks, SamplingParams(max_tokens=8, temperature=t, seed=3, ignore_eos=True))
        outs[t] = run_all(engine)[f"temp{t}"].outputs[0].token_ids
    assert outs[1e-44] == outs[1e-2]


def test_max_model_len_beyond_the_model_is_refused(tiny_dir, tokenizer):
    with pytest.raises(ValueError, match="more than the model's 512 positions"):  # (vLLM refuses it too)
        make_engine(tiny_dir, tokenizer, max_model_len=100_000)


def test_invalid_requests(engine):
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("bad0", [5, 6], GREEDY, "nope")
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad1", [5] * 600, GREEDY)  # longer than max_model_len (512)
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad2", [5, 6], SamplingParams(top_p=0))
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad3", [], GREEDY)
    assert not engine.has_unfinished()


def test_hot_load_replace_unload_during_generation(engine, tiny_shape, tokenizer, tmp_path):
    make_adapter(tmp_path / "v1", tiny_shape, seed=11, max_rank=6)
    make_adapter(tmp_path / "v2", tiny_shape, seed=12, max_rank=6)
    toks = tokenizer.encode(PROMPTS[2])
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine.load_adapter("hot", str(tmp_path / "v1"))
    ref1 = together(engine, [("h1", toks, "hot")], sp)["h1"]
    engine.load_adapter("other", str(tmp_path / "v2"))
    ref2 = together(engine, [("h2", toks, "other")], sp)["h2"]
    assert ref1 != ref2
    engine.add_request("h3", toks, sp, "hot")
    for _ in range(3):
        engine.step()
    info = engine.load_adapter("hot", str(tmp_path / "v2"), replace=True)  # mid-generation
    assert info.version == 2
    engine.add_request("h4", toks, sp, "hot")  # new requests get the new version
    engine.step()
    with pytest.raises(ValueError):
        engine.load_adapter("hot", str(tmp_path / "v1"))  # duplicate without replace
    engine.unload_adapter("other")
    out = run_all(engine)
    assert out["h3"].outputs[0].token_ids == ref1  # finished on the version it started with
    assert out["h4"].outputs[0].token_ids == ref2
    assert [v for v in engine.pool.versions if v.name == "hot"] == [engine.pool.current["hot"]]
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("h5", toks, sp, "other")
    engine.unload_adapter("hot")


def test_bad_adapter_refused_engine_keeps_serving(engine, tiny_shape, tokenizer, tmp_path):
    from drlora.adapter_format import AdapterFormatError, NotAnAdapterError

    good = make_adapter(tmp_path / "good", tiny_shape, seed=21, max_rank=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAnAdapterError):
        engine.load_adapter("x", str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "drlora_adapter.json").write_text((good / "drlora_adapter.json").read_text())
    (bad / "drlora_adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFormatError):
        engine.load_adapter("x", str(bad))
    big = make_adapter(tmp_path / "big", tiny_shape, seed=22, max_rank=300)
    with pytest.raises(AdapterFormatError):
        engine.load_adapter("x", str(big))  # rank above max_lora_rank / pool rows
    assert "x" not in {a.name for a in engine.list_adapters()}
    out = together(engine, [("ok", tokenizer.encode(PROMPTS[0]), "a")])
    assert len(out["ok"]) == 8


def test_adapter_trained_on_other_base_weights_is_served_with_a_warning(engine, tiny_shape, tmp_path, caplog):
    import json
    import logging

    from drlora.models import weights_fingerprint

    path = make_adapter(tmp_path / "other", tiny_shape, seed=23, max_rank=2)
    meta = path / "drlora_adapter.json"
    cfg = json.loads(meta.read_text())
    cfg["provenance"] = {"base_fingerprint": "0123456789abcdef"}
    meta.write_text(json.dumps(cfg))
    assert engine.pool.base_fingerprint == weights_fingerprint(engine.model_dir)
    with caplog.at_level(logging.WARNING, logger="drlora_serve.adapter_pool"):
        engine.load_adapter("other-base", str(path))
    assert "trained on base weights 0123456789abcdef" in caplog.text
    cfg["provenance"] = {"base_fingerprint": engine.pool.base_fingerprint}
    meta.write_text(json.dumps(cfg))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drlora_serve.adapter_pool"):
        engine.load_adapter("other-base", str(path), replace=True)
    assert "trained on base weights" not in caplog.text
    engine.unload_adapter("other-base")


def test_pool_eviction_and_compaction_keep_outputs(tiny_dir, tiny_shape, tokenizer, tmp_path):
    for i in range(5):
        make_adapter(tmp_path / f"z{i}", tiny_shape, seed=30 + i, max_rank=6)
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(tmp_path), max_loras=2, lora_pool_rank_rows=160)
    toks = tokenizer.encode(PROMPTS[1])
    ref = {f"z{i}": together(eng, [(f"r{i}", toks, f"z{i}")])[f"r{i}"] for i in range(5)}
    assert eng.pool.num_evictions > 0
    # fragment: evict the first of two resident adapters, load a third into the hole
    reqs = [(f"m{i}", toks, f"z{i % 5}") for i in range(10)]
    got = together(eng, reqs)
    assert got == {f"m{i}": ref[f"z{i % 5}"] for i in range(10)}
    moved = eng.compact_adapters()
    got = together(eng, [(f"k{i}", toks, f"z{i}") for i in range(2, 4)])
    assert got == {f"k{i}": ref[f"z{i}"] for i in range(2, 4)}
    assert moved >= 0


def test_compaction_when_fragmented(tiny_dir, tiny_shape, tokenizer, tmp_path):
    for name, r in (("pa", 2), ("pb", 2), ("pc", 2), ("pd", 4)):
        make_adapter(tmp_path / name, tiny_shape, seed=hash(name) % 1000, fixed_rank=r)
    # 16 experts: rank 2 -> 32 rows, rank 4 -> 64 rows; the pool holds 128 rows per key
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(tmp_path), max_loras=3, lora_pool_rank_rows=128)
    toks = tokenizer.encode(PROMPTS[0])
    ref = {}
    for name in ("pa", "pb", "pc"):
        ref[name] = together(eng, [(name, toks, name)])[name]
    for name in ("pa", "pc"):  # pb becomes least recently used
        assert together(eng, [(name + "2", toks, name)])[name + "2"] == ref[name]
    assert eng.runner.lora.num_compactions == 0
    out_d = together(eng, [("pd", toks, "pd")])["pd"]  # evicts pb: 64 rows free in two 32-row holes
    assert eng.runner.lora.num_compactions > 0
    assert eng.pool.current["pb"].slot is None
    got = together(eng, [(n + "3", toks, n) for n in ("pa", "pc", "pd")])
    assert got == {"pa3": ref["pa"], "pc3": ref["pc"], "pd3": out_d}
    fresh = make_engine(tiny_dir, tokenizer, adapters_dir=str(tmp_path), max_loras=3, lora_pool_rank_rows=128)
    assert together(fresh, [("pd", toks, "pd")])["pd"] == out_d  # same as without compaction


def test_round_robin_admission_across_adapters(tiny_dir, tokenizer, adapters_dir):
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_seqs=2)
    toks = tokenizer.encode(PROMPTS[1])
    for i in range(6):
        eng.add_request(f"burst{i}", toks, GREEDY, "a")
    eng.add_request("late", toks, GREEDY, "b")
    eng.step()
    running = {s.request.request_id for s in eng.scheduler.running}
    assert "late" in running, running  # b's single request is not stuck behind a's burst
    run_all(eng)


def test_dummy_load_format_runs_without_reading_weights(tiny_dir, tokenizer, tmp_path):
    """--load-format dummy: random weights of the config's shape; a folder with no safetensors."""
    import shutil

    folder = tmp_path / "cfg-only"
    folder.mkdir()
    for f in tiny_dir.glob("*.json"):
        shutil.copy(f, folder / f.name)
    assert not list(folder.glob("*.safetensors"))
    eng = make_engine(folder, tokenizer, load_format="dummy")
    eng.add_request("d", tokenizer.encode(PROMPTS[0]), GREEDY, None)
    assert len(run_all(eng)["d"].outputs[0].token_ids) == 8
    with pytest.raises(ValueError, match="load_format"):
        make_engine(folder, tokenizer, load_format="pickle")


def test_adapter_rewritten_on_disk_after_leaving_host_memory(tiny_dir, tiny_shape, tokenizer, tmp_path):
    """An adapter dropped from the host tier is read again from its folder only if the folder
    still holds what was registered. Rewritten (a retrain into the same folder, a failed
    reload, a rank over the pool's limits), its requests fail with an error that says so,
    instead of serving other weights under the same version (whose prefix-cache KV would then
    be wrong too) or waiting forever for a slot; the other requests go on."""
    import shutil

    from drlora.adapter_format import AdapterFormatError

    make_adapter(tmp_path / "ads" / "x", tiny_shape, seed=41, max_rank=4)
    make_adapter(tmp_path / "ads" / "y", tiny_shape, seed=42, max_rank=4)
    make_adapter(tmp_path / "other", tiny_shape, seed=43, max_rank=300)  # over max_lora_rank
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(tmp_path / "ads"), max_loras=1, max_cpu_loras=1)
    toks = tokenizer.encode(PROMPTS[1])
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref_y = together(eng, [("y0", toks, "y")], sp)["y0"]
    ref_x = together(eng, [("x0", toks, "x")], sp)["x0"]  # x in host memory, y dropped from it
    assert eng.pool.current["y"].adapter is None
    # files beside the adapter's own (a README edited, a training log) are not a change
    (tmp_path / "ads" / "y" / "NOTES.md").write_text("edited")
    (tmp_path / "ads" / "y" / "train_log.jsonl").write_text("{}\n")
    assert together(eng, [("y00", toks, "y")], sp)["y00"] == ref_y
    together(eng, [("x00", toks, "x")], sp)  # y dropped again
    assert eng.pool.current["y"].adapter is None
    for f in (tmp_path / "other").iterdir():
        shutil.copy(f, tmp_path / "ads" / "y" / f.name)
    eng.add_request("y1", toks, sp, "y")
    eng.add_request("b1", toks, sp)
    outs = run_all(eng)
    assert isinstance(outs["y1"].error, AdapterFormatError) and "changed on disk" in str(outs["y1"].error)
    assert outs["b1"].error is None and len(outs["b1"].outputs[0].token_ids) == 6
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
    eng.load_adapter("y", str(tmp_path / "ads" / "x"), replace=True)  # a reload serves again
    assert together(eng, [("y2", toks, "y")], sp)["y2"] == ref_x
