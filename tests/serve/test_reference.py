"""Mixed batch (base + 3 adapters of different per-expert ranks) against transformers'
OlmoeForCausalLM with each adapter merged into its weights. fp32, atol 1e-4 on logits."""

from __future__ import annotations

import torch

from drlora.adapter_format import read_adapter

from drlora_serve.types import SamplingParams

from serve_helpers import PROMPTS, make_engine, run_all_with_logits
from tests.family_helpers import merged_hf_model

ATOL = 1e-4


def test_mixed_batch_matches_transformers(tiny_dir, tiny_shape, tokenizer, adapters_dir):
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_batched_tokens=64)
    names = [None, "a", "b", "c"]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=3, logprobs=3)
    prompts = {}
    for i, name in enumerate(names):
        toks = tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " " + PROMPTS[3])  # > 1 chunk for some
        prompts[f"r{i}"] = toks
        eng.add_request(f"r{i}", toks, sp, name)
    # the engine's raw logits per request: prompt rows and generated rows
    outs, prompt_logits, gen_logits = run_all_with_logits(eng)
    for i, name in enumerate(names):
        rid = f"r{i}"
        adapter = read_adapter(adapters_dir / name) if name else None
        model = merged_hf_model(tiny_dir, adapter)
        out = outs[rid].outputs[0]
        full = prompts[rid] + out.token_ids
        with torch.no_grad():
            ref = model(torch.tensor([full])).logits[0].float()  # (L, V)
        P = len(prompts[rid])
        got_prompt = prompt_logits[rid]
        assert got_prompt.shape[0] == P - 1
        torch.testing.assert_close(got_prompt, ref[:P - 1], atol=ATOL, rtol=0)
        got_gen = gen_logits[rid]
        assert got_gen.shape[0] == len(out.token_ids)
        torch.testing.assert_close(got_gen, ref[P - 1:P - 1 + len(out.token_ids)], atol=ATOL, rtol=0)
        # greedy tokens identical to transformers' generate on the merged model
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompts[rid]]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        assert gen[0, P:].tolist() == out.token_ids, name
        # logprobs are log_softmax of the reference logits
        lp_ref = torch.log_softmax(ref, -1)
        for j, tl in enumerate(out.logprobs):
            assert abs(tl.logprob - lp_ref[P - 1 + j, tl.token_id].item()) < 1e-4
            assert set(tl.top) == set(torch.topk(lp_ref[P - 1 + j], 3).indices.tolist())
        pl = outs[rid].prompt_logprobs
        assert pl[0] is None and len(pl) == P
        for j in range(1, P):
            assert abs(pl[j].logprob - lp_ref[j - 1, prompts[rid][j]].item()) < 1e-4
    # adapters really change the model (the test would be vacuous otherwise)
    toks = {outs[f"r{i}"].outputs[0].token_ids[0] for i in range(4)}
    assert len(gen_logits) == 4 and len(toks) >= 1
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks or eng.args.enable_prefix_caching
