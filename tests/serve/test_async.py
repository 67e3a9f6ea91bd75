"""AsyncLLM (the server's EngineClient, with the engine core in its own process) and the
offline LLM API."""

from __future__ import annotations

import asyncio

import pytest

from drlora_serve.async_llm import AsyncLLM
from drlora_serve.llm import LLM
from drlora_serve.types import AdapterNotFoundError, InvalidRequestError, SamplingParams

from serve_helpers import PROMPTS, engine_args


def test_async_engine_streams_aborts_and_shuts_down(tiny_dir, tokenizer, adapters_dir):
    eng = AsyncLLM(engine_args(tiny_dir, adapters_dir=str(adapters_dir)), tokenizer=tokenizer)
    toks = tokenizer.encode(PROMPTS[0])
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def main():
        await eng.start()
        assert eng.max_model_len == 512 and eng.tokenizer is tokenizer and eng.model_name
        with pytest.raises(AdapterNotFoundError):
            eng.generate(toks, sp, "e0", adapter="missing")  # raised before streaming
        with pytest.raises(InvalidRequestError):
            eng.generate(toks, SamplingParams(max_tokens=1000), "e1")
        snaps = [o async for o in eng.generate(toks, sp, "e2", adapter="a")]
        assert snaps[-1].finished and len(snaps[-1].outputs[0].token_ids) == 6
        lens = [len(s.outputs[0].token_ids) for s in snaps]
        assert lens == sorted(lens)  # cumulative
        # concurrent requests, one closed early (client disconnect)
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        gen = eng.generate(toks, long, "e3", adapter="b")
        first = await gen.__anext__()
        assert not first.finished
        other = asyncio.create_task(_collect(eng.generate(toks, sp, "e4")))
        await gen.aclose()
        assert (await other)[-1].finished
        for _ in range(200):
            s = eng.stats()
            if s.num_running == 0 and s.num_waiting == 0 and not eng.processor.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert not eng.processor.has_unfinished()
        assert eng.stats().kv_cache_usage == 0  # every block free again
        info = await eng.load_adapter("a2", str(adapters_dir / "a"))
        assert info.name == "a2" and "a2" in {a.name for a in eng.list_adapters()}
        with pytest.raises(ValueError):
            await eng.load_adapter("a2", str(adapters_dir / "a"))
        await eng.unload_adapter("a2")
        with pytest.raises(AdapterNotFoundError):
            await eng.unload_adapter("a2")
        assert eng.stats().requests_finished_total >= 3
        # graceful shutdown finishes in-flight work
        task = asyncio.create_task(_collect(eng.generate(toks, sp, "e5")))
        await asyncio.sleep(0)
        await eng.shutdown(graceful=True)
        assert (await task)[-1].finished

    asyncio.run(main())


async def _collect(it):
    return [o async for o in it]


def test_llm_api(tiny_dir, adapters_dir):
    llm = LLM(str(tiny_dir), adapters=str(adapters_dir), num_kv_blocks=128, max_loras=2, lora_pool_rank_rows=512,
              lora_dense_rank_rows=64, device="cpu", dtype="float32")
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], sp, adapter=["a", None, "c"])
    assert [o.adapter for o in outs] == ["a", None, "c"]
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    one = llm.generate(PROMPTS[0], sp, adapter="a")
    assert one[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    ids = llm.tokenizer.encode(PROMPTS[1])
    assert llm.generate([ids], sp)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    llm.unload_adapter("c")
    with pytest.raises(AdapterNotFoundError):
        llm.generate("x", sp, adapter="c")
    llm.load_adapter("c", adapters_dir / "c")
    assert {a.name for a in llm.list_adapters()} == {"a", "b", "c"}
