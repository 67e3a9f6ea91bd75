"""OLMoE for serving: the shared routed-expert decoder (`models/moe.py`) bound to OLMoE.

OLMoE's differences live in `drlora.families` (q/k RMSNorm over the full projection width
before the head split, routing weights cast to the model dtype, optional `clip_qkv`); the
forward, the loading and `random()` are `MoeForServing`'s. Matches transformers'
OlmoeForCausalLM (tests/serve/test_reference.py).
"""

from __future__ import annotations

from drlora_serve.models.moe import MoeForServing

__all__ = ["OlmoeForServing"]


class OlmoeForServing(MoeForServing):
    model_type = "olmoe"
