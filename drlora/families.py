"""The routed-expert model families drlora trains and serves, described from their config.json.

One `Family` per transformers `model_type` says how the architecture differs from OLMoE's;
`MoeArch.from_config` resolves a config (a config.json dict or a transformers config object)
into every number and switch the engine and the trainer need, with transformers' own defaults
for keys a config leaves out. Checked against transformers 5.17 and 5.23 (`models/{olmoe,
qwen3_moe,qwen2_moe,mixtral}`):

| model_type | q/k norm | attention bias | router | shared expert | dense-MLP layers |
|---|---|---|---|---|---|
| olmoe | RMSNorm over the q/k width | q,k,v,o if `attention_bias` | softmax fp32, top-k, renormalised if `norm_topk_prob`, cast to the model dtype | no | no |
| qwen3_moe | RMSNorm per head | q,k,v,o if `attention_bias` | as OLMoE | no | `mlp_only_layers`, `decoder_sparse_step` |
| qwen2_moe | none | q,k,v if `qkv_bias` (default on) | as OLMoE | yes, output times sigmoid(x @ g) | as Qwen3 |
| mixtral | none | none | softmax fp32, top-k, always renormalised, kept fp32 | no | no |

Legend: L layers, E experts, K top-k, H hidden, I intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    hf_class: str  # transformers' causal-LM class
    qk_norm: str  # "full": over the q/k projection width; "head": per head (head_dim); "none"
    bias_key: str | None  # config key that turns attention biases on (None: never)
    bias_default: bool  # its default when the config leaves it out
    bias_projs: tuple[str, ...]  # projections that get a bias when on
    norm_topk_always: bool  # renormalise the top-k weights whatever the config says (Mixtral)
    cast_routing: bool  # routing weights cast to the model dtype before mixing (Mixtral keeps fp32)
    shared_expert: bool  # Qwen2-MoE: a dense shared expert beside the routed ones, sigmoid gated
    sparse_step: bool  # `mlp_only_layers` / `decoder_sparse_step` make some layers dense MLPs
    expert_size_key: str  # config key of an expert's intermediate size
    sliding: str  # "flag": window only if `use_sliding_window`; "set": whenever `sliding_window` is set
    eps_default: float
    theta_default: float
    hub_moe: str  # module of the MoE block in the hub's checkpoints (`mlp`; Mixtral `block_sparse_moe`)
    hub_experts: tuple[str, str, str]  # per-expert gate, up, down names in the hub's checkpoints


FAMILIES = {
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "full", "attention_bias", False, ("q", "k", "v", "o"),
                    False, True, False, False, "intermediate_size", "none", 1e-5, 10000.0,
                    "mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "head", "attention_bias", False, ("q", "k", "v", "o"),
                        False, True, False, True, "moe_intermediate_size", "flag", 1e-6, 10000.0,
                        "mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "none", "qkv_bias", True, ("q", "k", "v"),
                        False, True, True, True, "moe_intermediate_size", "flag", 1e-6, 10000.0,
                        "mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": Family("mixtral", "MixtralForCausalLM", "none", None, False, (),
                      True, False, False, False, "intermediate_size", "set", 1e-5, 1e6,
                      "block_sparse_moe", ("w1", "w3", "w2")),
}


class UnsupportedModelError(ValueError):
    """The config describes a model (or a feature of one) drlora does not implement."""


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"model_type '{model_type}' is not supported "
                                    f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


def _getter(cfg):
    if isinstance(cfg, dict):
        return lambda k, d=None: cfg.get(k, d) if cfg.get(k) is not None else d
    return lambda k, d=None: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else d


def dense_layers(cfg) -> tuple[int, ...]:
    """Layers whose MLP is a dense MLP (no experts), as transformers' Qwen MoE decoder layers
    decide: not sparse if listed in `mlp_only_layers` or (l + 1) % decoder_sparse_step != 0."""
    get = _getter(cfg)
    fam = FAMILIES.get(get("model_type", "olmoe"))
    if fam is None or not fam.sparse_step:
        return ()
    L, step = get("num_hidden_layers"), get("decoder_sparse_step", 1)
    only = set(get("mlp_only_layers", []) or [])
    E = get("num_experts") or get("num_local_experts") or 0
    return tuple(l for l in range(L) if l in only or E <= 0 or (l + 1) % step != 0)


@dataclass(frozen=True)
class MoeArch:
    """Everything the serving forward needs from a config, defaults filled in."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_size: int  # I of one routed expert
    dense_size: int  # I of a dense-MLP layer (0 if the family has none)
    shared_size: int  # I of the shared expert (0 if none)
    dense_layers: tuple[int, ...]
    norm_topk: bool
    attn_bias: tuple[str, ...]  # projections with a bias
    eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool
    clip_qkv: float | None

    @property
    def model_type(self) -> str:
        return self.family.model_type

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @classmethod
    def from_config(cls, cfg) -> MoeArch:
        get = _getter(cfg)
        fam = get_family(get("model_type", "olmoe"))
        check_supported(cfg)
        heads = get("num_attention_heads")
        bias = fam.bias_key is not None and bool(get(fam.bias_key, fam.bias_default))
        rope = get("rope_parameters") or {}
        return cls(
            family=fam, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"), num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            num_experts=get("num_experts") or get("num_local_experts"), top_k=get("num_experts_per_tok"),
            expert_size=get(fam.expert_size_key),
            dense_size=get("intermediate_size") if fam.sparse_step else 0,
            shared_size=get("shared_expert_intermediate_size", 0) if fam.shared_expert else 0,
            dense_layers=dense_layers(cfg),
            norm_topk=fam.norm_topk_always or bool(get("norm_topk_prob", False)),
            attn_bias=fam.bias_projs if bias else (),
            eps=get("rms_norm_eps", fam.eps_default),
            rope_theta=rope.get("rope_theta") or get("rope_theta", fam.theta_default),
            max_positions=get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            clip_qkv=get("clip_qkv") if fam.model_type == "olmoe" else None,
        )


def sliding_window(cfg) -> int | None:
    """The attention window transformers would apply, or None (full attention everywhere)."""
    get = _getter(cfg)
    fam = get_family(get("model_type", "olmoe"))
    if fam.sliding == "none":
        return None
    w = get("sliding_window")
    if fam.sliding == "flag" and not get("use_sliding_window", False):
        return None
    if not w:
        return None
    types = get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None
    return int(w)


def check_supported(cfg) -> None:
    """Refuse, in one line, what the engine does not implement: other activations, RoPE
    scaling, a sliding window that would cut the context short."""
    get = _getter(cfg)
    fam = get_family(get("model_type", "olmoe"))
    act = get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{fam.model_type}: hidden_act '{act}' is not supported (silu only)")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype != "default":
        raise UnsupportedModelError(f"{fam.model_type}: rope_type '{rtype}' is not supported (default RoPE only)")
    if get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{fam.model_type}: partial_rotary_factor is not supported")
    w = sliding_window(cfg)
    maxpos = get("max_position_embeddings", 4096)
    if w is not None and w < maxpos:
        raise UnsupportedModelError(
            f"{fam.model_type}: sliding_window={w} < max_position_embeddings={maxpos}: sliding-window "
            f"attention is not implemented (set use_sliding_window false or sliding_window null)")
