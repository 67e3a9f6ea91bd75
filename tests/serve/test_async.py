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
        assert all(s.num_cached_tokens == 0 for s in snaps)  # the first request: nothing cached
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
        # a request before the unload runs on the adapter; one submitted once the unload has
        # begun is a 404 up front (never an accepted stream that the core then fails)
        before = eng.generate(toks, sp, "u0", adapter="a2")
        unloading = asyncio.create_task(eng.unload_adapter("a2"))
        await asyncio.sleep(0)
        with pytest.raises(AdapterNotFoundError):
            eng.generate(toks, sp, "u1", adapter="a2")
        await unloading
        assert (await _collect(before))[-1].finished
        with pytest.raises(AdapterNotFoundError):
            await eng.unload_adapter("a2")
        assert eng.stats().requests_finished_total >= 3
        # graceful shutdown finishes in-flight work
        task = asyncio.create_task(_collect(eng.generate(toks, sp, "e5")))
        await asyncio.sleep(0)
        await eng.shutdown(graceful=True)
        done = await task
        assert done[-1].finished
        # e4 ran this prompt on the base before: every whole block but the last token's
        assert done[-1].num_cached_tokens == (len(toks) - 1) // 16 * 16 > 0

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
    n0 = len(llm.tokenizer.encode(PROMPTS[0]))
    assert outs[0].num_cached_tokens == 0 and one[0].num_cached_tokens == (n0 - 1) // 16 * 16 > 0
    ids = llm.tokenizer.encode(PROMPTS[1])
    assert llm.generate([ids], sp)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    llm.unload_adapter("c")
    with pytest.raises(AdapterNotFoundError):
        llm.generate("x", sp, adapter="c")
    llm.load_adapter("c", adapters_dir / "c")
    assert {a.name for a in llm.list_adapters()} == {"a", "b", "c"}
    # vLLM's prompt dicts, max_tokens=None (up to the context length), chat()
    ref = outs[1].outputs[0].token_ids
    assert llm.generate({"prompt_token_ids": ids}, sp)[0].outputs[0].token_ids == ref
    assert llm.generate([{"prompt": PROMPTS[1]}], sp)[0].outputs[0].token_ids == ref
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"text": "x"}, sp)
    full = llm.generate([ids], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(ids) + len(full.token_ids) == llm.engine.max_model_len and full.finish_reason == "length"
    msgs = [{"role": "user", "content": "Hi there"}]
    chat = llm.chat(msgs, sp)[0].outputs[0]
    text = llm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.token_ids == llm.generate([llm.tokenizer.encode(text, add_special_tokens=False)], sp)[0].outputs[0].token_ids
    assert len(llm.chat([msgs, msgs], sp)) == 2


def test_name_reloaded_with_other_weights_never_hits_the_old_prefix_cache(tiny_dir, tiny_shape, tmp_path):
    """Unload a name, load other weights under it: its version restarts, but its cached KV
    must not be reused (issue 10.1). The same prompt to the reloaded name and to the adapter
    the weights came from must then agree exactly."""
    from serve_helpers import make_adapter

    make_adapter(tmp_path / "lookup", tiny_shape, seed=21, std=0.3, dense=True)
    make_adapter(tmp_path / "flip", tiny_shape, seed=22, std=0.3, dense=True)
    llm = LLM(str(tiny_dir), adapters={"lookup": str(tmp_path / "lookup"), "flip": str(tmp_path / "flip")},
              num_kv_blocks=128, device="cpu", dtype="float32")
    prompt = " ".join(f"k{i}:{i * 7 % 100}" for i in range(12))  # several full KV blocks
    assert len(llm.tokenizer.encode(prompt)) >= 45
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    before = llm.generate(prompt, sp, adapter="lookup")[0].outputs[0]
    llm.unload_adapter("lookup")
    llm.load_adapter("lookup", tmp_path / "flip")
    again = llm.generate(prompt, sp, adapter="lookup")[0].outputs[0]
    flip = llm.generate(prompt, sp, adapter="flip")[0].outputs[0]
    assert again.token_ids == flip.token_ids != before.token_ids
    assert [x.logprob for x in again.logprobs] == pytest.approx([x.logprob for x in flip.logprobs], abs=1e-5)


def test_package_root_exports_vllm_names_lazily():
    """`from drlora_serve import LLM, SamplingParams` works as in vLLM, and importing the
    package or its light names does not import torch (issue 10.8)."""
    import subprocess
    import sys

    code = """
import sys
import drlora_serve
assert "torch" not in sys.modules, "import drlora_serve imported torch"
from drlora_serve import SamplingParams, EngineArgs, AsyncEngineArgs, RequestOutput, CompletionOutput
assert "torch" not in sys.modules, "a light name imported torch"
assert AsyncEngineArgs is EngineArgs and SamplingParams(max_tokens=3).max_tokens == 3
from drlora_serve import LLM, LLMEngine, AsyncLLM, AsyncLLMEngine
import drlora_serve.async_llm, drlora_serve.engine, drlora_serve.llm, drlora_serve.types
assert (LLM, LLMEngine, AsyncLLM) == (drlora_serve.llm.LLM, drlora_serve.engine.LLMEngine,
                                      drlora_serve.async_llm.AsyncLLM)
assert AsyncLLMEngine is AsyncLLM  # vLLM's older name
assert RequestOutput is drlora_serve.types.RequestOutput
assert set(drlora_serve.__all__) <= set(dir(drlora_serve)) and isinstance(drlora_serve.__version__, str)
try:
    drlora_serve.Nope
except AttributeError:
    pass
else:
    raise AssertionError("unknown names must raise AttributeError")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_engine_core_death_fails_requests_in_flight(tiny_dir, tokenizer):
    """If the core process dies, requests in flight fail (they do not hang), new ones are
    refused, and `dead` is set (the server's /health then answers 503)."""
    from drlora_serve.async_llm import EngineDeadError

    eng = AsyncLLM(engine_args(tiny_dir), tokenizer=tokenizer)
    toks = tokenizer.encode(PROMPTS[0])

    async def main():
        await eng.start()
        gen = eng.generate(toks, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), "d0")
        await gen.__anext__()  # running
        eng._proc.kill()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(gen), 10)
        assert eng.dead
        with pytest.raises(EngineDeadError):  # a 503, not the client's fault
            eng.generate(toks, SamplingParams(max_tokens=2), "d1")
        await eng.shutdown()

    asyncio.run(main())


def test_failed_start_then_shutdown_is_quiet(tiny_dir, tokenizer):
    """A core that fails to start (here: a max_model_len past the model's positions) is a
    RuntimeError from start(); the server's shutdown() afterwards sends nothing on the closed
    sockets (it used to leave a 'Future exception was never retrieved ... ZMQError' traceback)."""
    eng = AsyncLLM(engine_args(tiny_dir, max_model_len=100_000), tokenizer=tokenizer)
    unretrieved = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        with pytest.raises(RuntimeError, match="failed to start"):
            await eng.start()
        await eng.shutdown()
        await eng.shutdown()  # (twice: still nothing to do)

    asyncio.run(main())
    import gc

    gc.collect()  # an unretrieved future's exception is reported when it is collected
    assert not unretrieved, unretrieved
