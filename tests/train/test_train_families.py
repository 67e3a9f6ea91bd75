"""drlora-train on Qwen3-MoE, Qwen2-MoE and Mixtral (tiny random checkpoints, transformers' own
classes): DR-LoRA, uniform LoRA and static allocation hit the budget on the layers with experts,
the adapter records the family, and the engine serves it with transformers' logits."""

from __future__ import annotations

import pytest
import torch

from drlora.adapter_format import read_adapter
from drlora.models import MoeShape, resolve_model
from drlora_train.config import TrainConfig
from drlora_train.run import train

from tests.family_helpers import FAMILIES, merged_hf_model

SMALL = dict(r_init=2, r_target=4, r_max=8, batch_size=4, lr=5e-3, eval_max_examples=2,
             eval_max_new_tokens=2, progress=False, log_every=1000, device="cpu")
NAMES = {"qwen3_moe": "tiny-qwen3-moe", "qwen2_moe": "tiny-qwen2-moe", "mixtral": "tiny-mixtral"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_methods_train_and_the_adapter_is_served(model_type, arith_file, tmp_path):
    from transformers import AutoTokenizer

    from drlora_serve.config import EngineArgs
    from drlora_serve.engine import LLMEngine
    from drlora_serve.types import SamplingParams

    name = NAMES[model_type]
    shape = MoeShape.from_model_dir(resolve_model(name))
    sparse = shape.sparse_layers
    shared = 2 if shape.shared_expert_intermediate_size else 0  # Qwen2-MoE: LoRA on the shared expert too
    for method, steps in (("drlora", 8), ("lora", 3), ("static", 3)):
        s = train(TrainConfig(data=str(arith_file), output=str(tmp_path / method), model=name, method=method,
                              max_steps=steps, targets=("gate", "up", "down") if method == "drlora" else ("up", "down"),
                              shared_rank=shared if method == "drlora" else 0, **SMALL))
        ranks = torch.tensor(s["ranks"])  # L, E over every layer
        assert ranks.shape == (shape.num_hidden_layers, shape.num_experts)
        assert ranks[sparse].sum(1).tolist() == [shape.num_experts * 4] * len(sparse), method
        assert ranks[list(shape.dense_layers)].sum() == 0
        ad = read_adapter(tmp_path / method, shape)
        assert ad.config.base_shape == shape and ad.config.base_shape.model_type == model_type
        assert ad.config.expert_ranks("up").tolist() == ranks.tolist()
        if method == "lora":
            assert set(ranks[sparse].flatten().tolist()) == {4}
        if method == "drlora" and shared:
            assert ad.config.dense_ranks == {f"shared_{p}": [shared] * shape.num_hidden_layers
                                             for p in ("gate", "up", "down")}
            assert ad.tensors["layers.0.shared_expert.down.lora_B"].abs().max() > 0  # trained
    # the DR-LoRA adapter, served: engine logits == transformers' with the adapter merged
    d = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(str(d))
    args = EngineArgs(model=str(d), device="cpu", dtype="float32", num_kv_blocks=64, max_loras=2,
                      lora_pool_rank_rows=256, lora_modules={"dr": str(tmp_path / "drlora")})
    eng = LLMEngine(args, model_dir=d, tokenizer=tok)
    ids = tok.encode("12 + 7 = 19 and 3 + 4 =")
    eng.add_request("r", ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1), "dr")
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                res = out
    ad = read_adapter(tmp_path / "drlora")
    full = ids + res.outputs[0].token_ids
    with torch.no_grad():
        lp = torch.log_softmax(merged_hf_model(d, ad)(torch.tensor([full])).logits[0], -1)
        plain = torch.log_softmax(merged_hf_model(d)(torch.tensor([full])).logits[0], -1)
    assert (lp - plain).abs().max() > 1e-3  # the trained adapter changes the model
    for j in range(1, len(ids)):
        assert abs(res.prompt_logprobs[j].logprob - lp[j - 1, ids[j]].item()) < 1e-4
    assert res.outputs[0].token_ids == lp[len(ids) - 1:len(full) - 1].argmax(-1).tolist()


def test_shared_expert_lora_resumes_exactly_and_needs_a_shared_expert(arith_file, tmp_path):
    import shutil

    from drlora_train.config import ConfigError

    cfg = dict(data=str(arith_file), model="tiny-qwen2-moe", max_steps=6, shared_rank=3, targets=("up", "down"),
               **SMALL)
    train(TrainConfig(output=str(tmp_path / "full"), checkpoint_every=3, **cfg))
    shutil.copytree(tmp_path / "full" / "checkpoint", tmp_path / "resumed" / "checkpoint")  # after step 3
    train(TrainConfig(output=str(tmp_path / "resumed"), resume=True, **cfg))
    a, b = read_adapter(tmp_path / "full"), read_adapter(tmp_path / "resumed")
    assert a.config.dense_ranks == {"shared_up": [3] * 3, "shared_down": [3] * 3}
    for k, v in a.tensors.items():
        assert torch.allclose(v, b.tensors[k], atol=1e-6, rtol=0), k
    with pytest.raises(ConfigError, match="no shared expert"):
        train(TrainConfig(output=str(tmp_path / "x"), **{**cfg, "model": "tiny-mixtral"}))
