"""Qwen3-MoE, Qwen2-MoE and Mixtral in the engine, against transformers' own classes.

Per family, a tiny random checkpoint (drlora/tiny_families.py, saved by transformers with a
real tokenizer): a mixed batch of the base and two adapters with different per-expert ranks
(one with attention LoRA and, on Qwen2-MoE, shared-expert LoRA; one with its own router) gives
the logits of transformers' model with each adapter merged, prompt and generated rows, fp32 at
atol 1e-4, and the same greedy tokens. Both checkpoint layouts (the hub's per-expert keys and
transformers v5's fused experts) load to identical weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from drlora.adapter_format import read_adapter
from drlora.models import MoeShape
from drlora.tiny_families import ensure_tiny_family
from drlora_serve.models.moe import MoeForServing
from drlora_serve.types import SamplingParams

from tests.family_helpers import FAMILIES, merged_hf_model
from serve_helpers import PROMPTS, make_adapter, make_engine, run_all, run_all_with_logits

ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(model dir, tokenizer, adapters dir) of one family."""
    from transformers import AutoTokenizer

    d = ensure_tiny_family(request.param)
    shape = MoeShape.from_model_dir(d)
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    make_adapter(root / "a", shape, seed=11, max_rank=8, dense=True, shared=bool(shape.shared_expert_intermediate_size))
    make_adapter(root / "b", shape, seed=12, max_rank=12, router=True, targets=("up", "down"))
    return d, AutoTokenizer.from_pretrained(str(d)), root


def test_shape_records_the_family(family):
    d, _, _ = family
    cfg = json.loads((d / "config.json").read_text())
    s = MoeShape.from_model_dir(d)
    assert s.model_type == cfg["model_type"] and s.num_experts == 8
    if s.model_type == "qwen3_moe":
        assert s.dense_layers == (1,) and s.intermediate_size == cfg["moe_intermediate_size"] == 32
        assert s.head_dim == 24 != s.hidden_size // s.num_attention_heads
    elif s.model_type == "qwen2_moe":
        assert s.shared_expert_intermediate_size == 48 and s.dense_layers == ()
    else:
        assert s.intermediate_size == cfg["intermediate_size"] and cfg["num_local_experts"] == 8


def test_mixed_batch_matches_transformers(family):
    d, tok, adapters = family
    eng = make_engine(d, tok, adapters_dir=str(adapters), max_num_batched_tokens=48)
    names = [None, "a", "b"]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=1)
    prompts = {}
    for i, name in enumerate(names):
        toks = tok.encode(PROMPTS[i] + " " + PROMPTS[3])  # more than one prefill chunk for some
        prompts[f"r{i}"] = toks
        eng.add_request(f"r{i}", toks, sp, name)
    outs, prompt_logits, gen_logits = run_all_with_logits(eng)
    refs = {}
    for i, name in enumerate(names):
        rid = f"r{i}"
        model = merged_hf_model(d, read_adapter(adapters / name) if name else None)
        out = outs[rid].outputs[0]
        full = prompts[rid] + out.token_ids
        with torch.no_grad():
            ref = model(torch.tensor([full])).logits[0].float()  # (L, V)
        refs[name] = ref
        P = len(prompts[rid])
        got_prompt = prompt_logits[rid]
        assert got_prompt.shape[0] == P - 1
        torch.testing.assert_close(got_prompt, ref[:P - 1], atol=ATOL, rtol=0)
        got_gen = gen_logits[rid]
        assert got_gen.shape[0] == len(out.token_ids) == 6
        torch.testing.assert_close(got_gen, ref[P - 1:P + 5], atol=ATOL, rtol=0)
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompts[rid]]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert gen[0, P:].tolist() == out.token_ids, name
    # the adapters really change the model (else the comparison above proves little)
    base = merged_hf_model(d)
    for name in ("a", "b"):
        full = prompts["r1" if name == "a" else "r2"]
        with torch.no_grad():
            plain = base(torch.tensor([full])).logits[0]
        assert (refs[name][:len(full)] - plain).abs().max() > 1e-2, name


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hub_and_fused_layouts_load_identically(model_type):
    from transformers import AutoModelForCausalLM

    hub, fused = ensure_tiny_family(model_type, "hub"), ensure_tiny_family(model_type, "fused")
    from safetensors import safe_open

    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    with safe_open(str(hub / "model.safetensors"), "pt") as f:
        want = "block_sparse_moe.experts.0.w1" if model_type == "mixtral" else "mlp.experts.0.gate_proj"
        assert f"model.layers.0.{want}.weight" in f.keys()
    cfg = json.loads((hub / "config.json").read_text())
    a = MoeForServing.from_pretrained(hub, cfg, torch.float32, torch.device("cpu"))
    b = MoeForServing.from_pretrained(fused, cfg, torch.float32, torch.device("cpu"))
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        for k in la:
            torch.testing.assert_close(la[k], lb[k], atol=0, rtol=0)
    # and transformers reads the fused file as the same model (so the layout is really v5's)
    sa = AutoModelForCausalLM.from_pretrained(str(hub)).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(str(fused)).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_tied_embeddings(layout):
    """tie_word_embeddings: no lm_head in the checkpoint, the embedding is the output layer."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    d = ensure_tiny_family("qwen3_moe", layout, tied=True)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    tok = AutoTokenizer.from_pretrained(str(d))
    eng = make_engine(d, tok)
    ids = tok.encode(PROMPTS[0])
    eng.add_request("r", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=1))
    out = run_all(eng)["r"]
    model = merged_hf_model(d)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + out.outputs[0].token_ids])).logits[0], -1)
    for j in range(1, len(ids)):
        assert abs(out.prompt_logprobs[j].logprob - lp[j - 1, ids[j]].item()) < 1e-4
    assert out.outputs[0].token_ids == lp[len(ids) - 1:-1].argmax(-1).tolist()


def test_adapter_of_another_family_is_refused(family, tiny_shape, tmp_path):
    from drlora.adapter_format import AdapterFormatError

    d, tok, _ = family
    eng = make_engine(d, tok)
    make_adapter(tmp_path / "olmoe", tiny_shape, seed=1)
    with pytest.raises(AdapterFormatError, match="model_type|num_hidden_layers|hidden_size"):
        eng.load_adapter("x", str(tmp_path / "olmoe"))


@pytest.mark.parametrize("alias", ["olmoe", "qwen3-moe", "qwen2-moe", "mixtral"])
def test_load_format_dummy_at_each_preset_structure(alias, tmp_path):
    """`--load-format dummy` on each preset's config, its dims shrunk to fit a CPU test (the
    switches, layer kinds, GQA ratios and experts-per-token kept): random weights, no checkpoint,
    base and adapter requests served."""
    from drlora.models import PRESETS, resolve_model
    from drlora.tiny_families import copy_tokenizer
    from transformers import AutoTokenizer

    small = {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 1024, "max_position_embeddings": 256}
    cfg = {**PRESETS[alias], **small}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    cfg |= {"num_attention_heads": 4, "num_key_value_heads": 4 * kv // heads}
    if "head_dim" in cfg:
        cfg["head_dim"] = 32  # != 64 / 4, as Qwen3-30B-A3B's 128 != 2048 / 32
    for k in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if k in cfg:
            cfg[k] = 48
    E = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    cfg[E] = min(cfg[E], 16)
    folder = tmp_path / alias
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    copy_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    eng = make_engine(folder, tok, load_format="dummy", max_loras=2)
    assert type(eng.runner.model).__name__.endswith("ForServing") and eng.runner.model.arch.model_type == cfg["model_type"]
    shape = eng.runner.shape
    make_adapter(tmp_path / "ad", shape, seed=1, max_rank=4, dense=True, shared=bool(shape.shared_expert_intermediate_size))
    eng.load_adapter("ad", str(tmp_path / "ad"))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    eng.add_request("base", tok.encode(PROMPTS[0]), sp)
    eng.add_request("lora", tok.encode(PROMPTS[0]), sp, "ad")
    outs = run_all(eng)
    for r in ("base", "lora"):
        o = outs[r].outputs[0]
        assert len(o.token_ids) == 4 and all(0 <= t < 1024 for t in o.token_ids)
        assert all(torch.isfinite(torch.tensor(lp.logprob)) for lp in o.logprobs)
    assert resolve_model(alias, dummy=True).name == alias  # the real-shape folder, no download
