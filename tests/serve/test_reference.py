"""Mixed batch (base + 3 adapters of different per-expert ranks) against transformers'
OlmoeForCausalLM with each adapter merged into its weights. fp32, atol 1e-4 on logits."""

from __future__ import annotations

import torch

from drlora.adapter_format import read_adapter

from drlora_serve.types import SamplingParams

from serve_helpers import PROMPTS, make_engine, run_all

ATOL = 1e-4


def merged_hf_model(tiny_dir, adapter=None):
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    if adapter is None:
        return model
    I = model.config.intermediate_size
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts
            for p in adapter.config.ranks:
                d = adapter.expert_delta(l, p)  # (E, out, in)
                if p == "gate":
                    ex.gate_up_proj[:, :I] += d
                elif p == "up":
                    ex.gate_up_proj[:, I:] += d
                else:
                    ex.down_proj += d
            for p, ranks in adapter.config.dense_ranks.items():
                A, B = adapter.dense_lora(l, p)
                getattr(layer.self_attn, p).weight += adapter.config.scaling * B.float() @ A.float()
            w = adapter.router_weight(l)
            if w is not None:
                layer.mlp.gate.weight.copy_(w)
    return model


def test_mixed_batch_matches_transformers(tiny_dir, tiny_shape, tokenizer, adapters_dir):
    eng = make_engine(tiny_dir, tokenizer, adapters_dir=str(adapters_dir), max_num_batched_tokens=64)
    captured = []
    launch = eng.runner.launch

    def spy(batch):
        step = launch(batch)
        captured.append(step)
        return step

    eng.runner.launch = spy
    names = [None, "a", "b", "c"]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=3, logprobs=3)
    prompts = {}
    for i, name in enumerate(names):
        toks = tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " " + PROMPTS[3])  # > 1 chunk for some
        prompts[f"r{i}"] = toks
        eng.add_request(f"r{i}", toks, sp, name)
    outs = run_all(eng)
    # collect the engine's raw logits per request: prompt rows then generated rows
    prompt_logits = {r: [] for r in prompts}
    gen_logits = {r: [] for r in prompts}
    for step in captured:
        for seq, start, rows in step.prompt_logits:
            prompt_logits[seq.request.request_id].append((start, rows))
        for j, seq in enumerate(step.sample_seqs):
            gen_logits[seq.request.request_id].append(step.sample_logits[j])
    for i, name in enumerate(names):
        rid = f"r{i}"
        adapter = read_adapter(adapters_dir / name) if name else None
        model = merged_hf_model(tiny_dir, adapter)
        out = outs[rid].outputs[0]
        full = prompts[rid] + out.token_ids
        with torch.no_grad():
            ref = model(torch.tensor([full])).logits[0].float()  # (L, V)
        P = len(prompts[rid])
        got_prompt = torch.cat([rows for _, rows in sorted(prompt_logits[rid], key=lambda x: x[0])])
        assert got_prompt.shape[0] == P - 1
        torch.testing.assert_close(got_prompt, ref[:P - 1], atol=ATOL, rtol=0)
        got_gen = torch.stack(gen_logits[rid])
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
