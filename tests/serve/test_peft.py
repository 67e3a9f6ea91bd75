"""PEFT adapter folders are served (converted on load by drlora.peft)."""

from __future__ import annotations

import pytest
import torch

from drlora_serve.types import SamplingParams

from serve_helpers import PROMPTS, make_engine, run_all

interop = pytest.importorskip("drlora.peft")
peft = pytest.importorskip("peft")
if not hasattr(interop, "peft_to_drlora"):
    pytest.skip("drlora.peft.peft_to_drlora is not there yet", allow_module_level=True)


def test_peft_attention_lora_matches_merged_model(tiny_dir, tokenizer, tmp_path):
    from transformers import OlmoeForCausalLM

    torch.manual_seed(0)
    base = OlmoeForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    model.save_pretrained(tmp_path / "peft_attn")
    merged = model.merge_and_unload().eval()
    eng = make_engine(tiny_dir, tokenizer)
    eng.load_adapter("p", str(tmp_path / "peft_attn"))
    toks = tokenizer.encode(PROMPTS[0])
    eng.add_request("r", toks, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "p")
    got = run_all(eng)["r"].outputs[0].token_ids
    with torch.no_grad():
        ref = merged.generate(torch.tensor([toks]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)[0, len(toks):].tolist()
    assert got == ref
