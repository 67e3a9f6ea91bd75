"""Reference helpers for the model families: transformers' own model with an adapter's deltas
merged into its weights (the ground truth the engine is compared with).

# E experts, I expert intermediate
"""

from __future__ import annotations

import torch

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")


def merge_adapter(model, adapter) -> None:
    """Add every delta of a drlora adapter to a transformers v5 MoE model, in place: expert
    LoRA into the fused `gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I), attention and
    shared-expert LoRA into their Linear weights, a trained router over `mlp.gate`."""
    cfg = adapter.config
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            ex = getattr(layer.mlp, "experts", None)
            if ex is not None:
                I = ex.down_proj.shape[-1]
                for p in cfg.ranks:
                    d = adapter.expert_delta(l, p).to(ex.down_proj.dtype)  # (E, out, in)
                    if p == "gate":
                        ex.gate_up_proj[:, :I] += d
                    elif p == "up":
                        ex.gate_up_proj[:, I:] += d
                    else:
                        ex.down_proj += d
            for p in cfg.dense_ranks:
                A, B = adapter.dense_lora(l, p)
                if A.shape[0] == 0:
                    continue
                if p.startswith("shared_"):
                    lin = getattr(layer.mlp.shared_expert, p[len("shared_"):] + "_proj")
                else:
                    lin = getattr(layer.self_attn, p)
                lin.weight += (cfg.scaling * B.float() @ A.float()).to(lin.weight.dtype)
            w = adapter.router_weight(l)
            if w is not None:
                layer.mlp.gate.weight.copy_(w)


def merged_hf_model(model_dir, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter is not None:
        merge_adapter(model, adapter)
    return model
