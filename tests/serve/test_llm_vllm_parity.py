"""The offline LLM API as a vLLM user calls it: LLM(enable_lora=...), LoRARequest, lora_request=,
use_tqdm=, the fields of RequestOutput / CompletionOutput, vLLM-shaped logprobs, chat()'s
template options, SamplingParams as vLLM normalizes it."""

from __future__ import annotations

import pickle

import pytest

from drlora_serve import LLM, CompletionOutput, Logprob, LoRARequest, SamplingParams
from drlora_serve.types import AdapterNotFoundError

from serve_helpers import PROMPTS

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_dir, adapters_dir):
    # vLLM's LoRA flags: enable_lora (always on here), trust_remote_code, tensor_parallel_size=1;
    # seed=None (vLLM: no fixed seed) failed inside torch.manual_seed
    return LLM(model=str(tiny_dir), seed=None, enable_lora=True, max_lora_rank=64, max_loras=2, trust_remote_code=True,
               tensor_parallel_size=1, disable_log_stats=True, adapters=str(adapters_dir), num_kv_blocks=128,
               lora_pool_rank_rows=512, lora_dense_rank_rows=64, device="cpu", dtype="float32")


def test_constructor_refuses_what_it_cannot_do(tiny_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model=str(tiny_dir), tensor_parallel_size=2)
    with pytest.raises(TypeError, match="swap_space"):
        LLM(model=str(tiny_dir), swap_space=4)


def test_logprobs_are_vllm_shaped(llm):
    """vLLM: outputs[i].logprobs is one dict per token, {token id: Logprob(logprob, rank,
    decoded_token)}, the sampled token first, then the top k (so k or k + 1 entries);
    cumulative_logprob the sum of the sampled tokens' logprobs."""
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2, **GREEDY))[0]
    o = out.outputs[0]
    assert len(o.logprobs) == len(o.token_ids) == 5
    for tok, d in zip(o.token_ids, o.logprobs):
        assert next(iter(d)) == tok and len(d) in (3, 4)
        lp = d[tok]
        assert isinstance(lp, Logprob) and lp.rank == 1  # greedy: the sampled token is the most likely
        assert lp.decoded_token == llm.get_tokenizer().decode([tok])
        ranks = sorted(v.rank for t, v in d.items())
        assert ranks == [1, 2, 3]  # the sampled token is also the top 1
        assert dict(d.items()) == {t: d[t] for t in d}
        # the old attributes still work
        assert d.token_id == tok and d.logprob == lp.logprob and len(d.top) == 3
    assert o.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(o.token_ids, o.logprobs)))
    # prompt logprobs: None first, then the prompt token (with its rank) and the top 2
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(out.prompt_token_ids)
    for tok, d in zip(out.prompt_token_ids[1:], plp[1:]):
        assert next(iter(d)) == tok and len(d) in (2, 3) and d[tok].rank >= 1
        assert [d[t].rank for t in d.top] == list(range(1, len(d.top) + 1))
    # a sampled token outside the top k: k + 1 entries, the top k ranked 1..k, the token its own
    # rank, as vLLM (every token's rank, as scoring the same text as a prompt ranks it)
    first = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=5.0, seed=3, logprobs=1))[0]
    hot = first.outputs[0]
    outside = [(t, d) for t, d in zip(hot.token_ids, hot.logprobs) if len(d) == 2]
    assert outside
    for t, d in outside:
        other = next(k for k in d if k != t)
        assert d[other].rank == 1 and d[t].logprob <= d[other].logprob and d[t].rank > 1
    scored = llm.generate({"prompt_token_ids": first.prompt_token_ids + hot.token_ids},
                          SamplingParams(max_tokens=1, prompt_logprobs=0, **GREEDY))[0].prompt_logprobs
    n = len(first.prompt_token_ids)
    assert [d[t].rank for t, d in zip(hot.token_ids, hot.logprobs)] == \
        [d[t].rank for t, d in zip(hot.token_ids, scored[n:])]
    assert [d[t].logprob for t, d in zip(hot.token_ids, hot.logprobs)] == \
        pytest.approx([d[t].logprob for t, d in zip(hot.token_ids, scored[n:])], abs=1e-4)
    # logprobs=0: the sampled token alone
    zero = llm.generate(PROMPTS[1], SamplingParams(max_tokens=2, logprobs=0, **GREEDY))[0].outputs[0]
    assert [list(d) for d in zero.logprobs] == [[t] for t in zero.token_ids]
    # no logprobs asked: None (vLLM)
    plain = llm.generate(PROMPTS[1], SamplingParams(max_tokens=2, **GREEDY))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None
    # outputs pickle (multiprocessing, saving results) and keep their decoded tokens
    back = pickle.loads(pickle.dumps(out))
    assert back.outputs[0].logprobs[0][o.token_ids[0]] == o.logprobs[0][o.token_ids[0]]


def test_lora_request_and_output_fields(llm, adapters_dir, tmp_path):
    sp = SamplingParams(max_tokens=4, **GREEDY)
    ref = llm.generate(PROMPTS[0], sp, adapter="a")[0]
    # a registered adapter by name (lora_path may be left out here), or by its own folder
    for lr in (LoRARequest("a", 1), LoRARequest("a", 1, str(adapters_dir / "a"))):
        out = llm.generate(PROMPTS[0], sp, lora_request=lr, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.lora_request is lr and out.outputs[0].lora_request is lr and out.adapter == "a"
    # vLLM's fields
    assert out.prompt == PROMPTS[0] and out.request_id and out.finished
    assert out.outputs[0].finished() and out.outputs[0].finish_reason == "length"
    assert out.num_cached_tokens is None or out.num_cached_tokens >= 0
    assert llm.generate({"prompt_token_ids": ref.prompt_token_ids}, sp)[0].prompt is None
    # a new name with a path: loaded on first use (as vLLM loads LoRARequests), then reused
    lr = LoRARequest("a_copy", 7, str(adapters_dir / "a"))
    outs = llm.generate([PROMPTS[0], PROMPTS[1]], sp, lora_request=[lr, None], use_tqdm=True)
    assert outs[0].outputs[0].token_ids == ref.outputs[0].token_ids and outs[1].lora_request is None
    assert "a_copy" in {a.name for a in llm.list_adapters()}
    assert llm.generate(PROMPTS[0], sp, lora_request=lr)[0].outputs[0].token_ids == ref.outputs[0].token_ids
    # the same name from another folder is refused (unload it, or load_inplace=True to replace it)
    with pytest.raises(ValueError, match="a_copy"):
        llm.generate(PROMPTS[0], sp, lora_request=LoRARequest("a_copy", 7, str(adapters_dir / "b")))
    b = llm.generate(PROMPTS[0], sp, adapter="b")[0].outputs[0].token_ids
    inplace = LoRARequest("a_copy", 7, str(adapters_dir / "b"), load_inplace=True)
    assert llm.generate(PROMPTS[0], sp, lora_request=inplace)[0].outputs[0].token_ids == b
    llm.unload_adapter("a_copy")
    with pytest.raises(AdapterNotFoundError):
        llm.generate(PROMPTS[0], sp, lora_request=LoRARequest("nowhere", 3))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, str(tmp_path))
    with pytest.raises(ValueError, match="one of"):
        llm.generate(PROMPTS[0], sp, adapter="a", lora_request=LoRARequest("a", 1))
    # a callable use_tqdm wraps the progress bar (vLLM)
    seen = []

    def bar(*args, **kw):
        from tqdm import tqdm
        seen.append(kw.get("total"))
        return tqdm(*args, **kw)

    llm.generate([PROMPTS[0], PROMPTS[1]], sp, use_tqdm=bar)
    assert seen == [2]
    assert llm.llm_engine is llm.engine and llm.get_tokenizer() is llm.tokenizer


def test_sampling_params_normalized_as_vllm(llm):
    """A single stop string is one stop string (it was taken as its characters), None lists
    are empty (vLLM)."""
    sp = SamplingParams(max_tokens=8, **GREEDY)
    text = llm.generate(PROMPTS[2], sp)[0].outputs[0].text
    stop = text[2:5]
    assert len(set(stop)) > 1 and stop[0] not in text[:2]
    o = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, stop=stop, **GREEDY))[0].outputs[0]
    assert o.text == text[:2] and o.stop_reason == stop
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(bad_words="x").bad_words == ["x"]
    # bad values fail at construction, as in vLLM (a ValueError naming the field); max_tokens=None
    # (up to the context length) is allowed there, min_tokens then unbounded
    for bad, field in ((dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
                       (dict(max_tokens=-2), "max_tokens"), (dict(max_tokens=2, min_tokens=3), "min_tokens"),
                       (dict(logprobs=21), "logprobs"), (dict(output_kind="all"), "output_kind")):
        with pytest.raises(ValueError, match=field) as e:
            SamplingParams(**bad)
        assert e.value.param == field
    assert SamplingParams(max_tokens=None, min_tokens=5).max_tokens is None


def test_detokenize_false_gives_token_ids_only(llm):
    """vLLM's detokenize=False: the same tokens, text "", no decoded_token; stop strings refused
    (they need text), stop_token_ids still stop."""
    for kind in ("cumulative", "final", "delta"):
        ref = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, logprobs=1, output_kind=kind, **GREEDY))[0]
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, logprobs=1, output_kind=kind, detokenize=False,
                                                      **GREEDY))[0]
        o, r = out.outputs[0], ref.outputs[0]
        assert o.token_ids == r.token_ids and r.text and o.text == ""
        assert [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)] == \
            [d[t].logprob for t, d in zip(r.token_ids, r.logprobs)]
        assert all(d[t].decoded_token is None for t, d in zip(o.token_ids, o.logprobs))
    with pytest.raises(ValueError, match="detokenize") as e:
        SamplingParams(stop=["x"], detokenize=False)
    assert e.value.param == "stop"
    stop_at = ref.outputs[0].token_ids[2]
    o = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, stop_token_ids=[stop_at], detokenize=False,
                                                **GREEDY))[0].outputs[0]
    assert o.token_ids[-1] == stop_at and o.finish_reason == "stop" and o.text == ""


def test_chat_options(llm):
    sp = SamplingParams(max_tokens=3, **GREEDY)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    out = llm.chat(msgs, sp, continue_final_message=True, add_generation_prompt=False)[0]
    assert out.prompt.endswith("The answer is")  # the final message left open
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(msgs, sp, continue_final_message=True)  # with add_generation_prompt=True
    tmpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix }}"
    out = llm.chat([{"role": "user", "content": "Hi"}], sp, chat_template=tmpl,
                   chat_template_kwargs={"suffix": " there"})[0]
    assert out.prompt == "Hi there"
    many = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]], sp,
                    lora_request=LoRARequest("a", 1), use_tqdm=False)
    assert [o.adapter for o in many] == ["a", "a"] and many[0].lora_request.lora_name == "a"
    assert many[0].prompt == llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                               add_generation_prompt=True)


def test_completion_output_defaults():
    o = CompletionOutput(0, "", [])
    assert o.cumulative_logprob is None and o.lora_request is None and not o.finished()


def test_no_chat_template_says_what_to_do(llm, tokenizer):
    """A tokenizer without a chat template: LLM.chat's ValueError (and the server's 400, which
    renders through the same chat_prompt) says what the caller can do instead."""
    import copy

    from drlora_serve.preprocess import chat_prompt

    bare = copy.copy(tokenizer)
    bare.chat_template = None
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="no chat template; use /v1/completions"):
        chat_prompt(bare, msgs, instead="use /v1/completions")
    have = llm.tokenizer
    llm.tokenizer = bare
    try:
        with pytest.raises(ValueError, match="no chat template; use generate"):
            llm.chat(msgs)
        assert llm.chat(msgs, SamplingParams(max_tokens=1), chat_template="{{ messages[0]['content'] }}")[0].prompt == "Hi"
    finally:
        llm.tokenizer = have
