"""The routed-expert decoder written for serving, shared by every supported family (OLMoE,
Qwen3-MoE, Qwen2-MoE, Mixtral): flattened tokens of many sequences, paged KV cache, per-token
adapter slots (rank-exact expert LoRA, optional attention LoRA, optional shared-expert LoRA,
optional per-adapter router).

Legend: T tokens, H hidden, I expert intermediate, IS shared-expert intermediate, ID dense-MLP
intermediate, E experts, K top-k, QH/KVH query/kv heads, D head dim, V vocab.

The families differ only where `drlora.families.MoeArch` says (q/k norm over the projection
width, per head or none; attention biases; top-k renormalisation and the routing weights' dtype;
Qwen2-MoE's sigmoid-gated shared expert; Qwen MoE dense-MLP layers). Each matches its
transformers class op for op: RMSNorm in fp32 then cast, rotate-half default RoPE, router softmax
in fp32 then top-k. Checkpoints load from the hub's per-expert layout (`mlp.experts.{e}.
{gate,up,down}_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`) or transformers v5's
fused `mlp.experts.gate_up_proj` (E, 2I, H, gate rows first) / `mlp.experts.down_proj` (E, H, I).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import (add_rms_norm_, attention_input, dense_lora_, dense_lora_cols_, dense_lora_plan, fused_moe,
                     paged_decode_attention, paged_prefill_attention, rms_norm, route_topk)

from drlora.families import MoeArch
from drlora_serve.context import ForwardContext
from drlora_serve.weights import WeightSource


class MoeForServing:
    model_type: str | None = None  # a subclass bound to one family refuses the others

    def __init__(self, config: dict, dtype: torch.dtype, device: torch.device):
        self.config, self.dtype, self.device = config, dtype, device
        self.arch = a = MoeArch.from_config(config)
        if self.model_type is not None and a.model_type != self.model_type:
            raise ValueError(f"{type(self).__name__} serves model_type '{self.model_type}', not '{a.model_type}'")
        self.num_layers, self.hidden = a.num_layers, a.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.num_experts, self.top_k, self.norm_topk = a.num_experts, a.top_k, a.norm_topk
        self.eps, self.clip_qkv, self.vocab = a.eps, a.clip_qkv, a.vocab_size
        self.max_positions = a.max_positions
        d = self.head_dim
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device, dtype)  # (maxpos, D)
        self.sin = emb.sin().to(device, dtype)
        self.scale = d ** -0.5
        self.layers: list[dict[str, torch.Tensor]] = []
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # set by the runner

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir, config: dict, dtype, device) -> MoeForServing:
        m = cls(config, dtype, device)
        a, fam = m.arch, m.arch.family
        src = WeightSource(model_dir)
        ld = lambda n: src.load(n, dtype, device)  # noqa: E731
        m.embed = ld("model.embed_tokens.weight")
        m.norm = ld("model.norm.weight")
        tied = a.tie_word_embeddings or "lm_head.weight" not in src
        m.lm_head = m.embed if tied else ld("lm_head.weight")
        for l in range(m.num_layers):
            p = f"model.layers.{l}."
            at = p + "self_attn."
            q, k, v = (ld(at + f"{n}_proj.weight") for n in "qkv")
            layer = {
                "in_norm": ld(p + "input_layernorm.weight"),
                "post_norm": ld(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([q, k, v], 0).contiguous(),  # (QH*D + 2*KVH*D, H)
                "o": ld(at + "o_proj.weight"),
            }
            del q, k, v
            if "q" in a.attn_bias:
                layer["qkv_bias"] = torch.cat([ld(at + f"{n}_proj.bias") for n in "qkv"])
            if "o" in a.attn_bias:
                layer["o_bias"] = ld(at + "o_proj.bias")
            if fam.qk_norm != "none":  # (QH*D,)/(KVH*D,) full width, or (D,) per head
                layer["q_norm"], layer["k_norm"] = ld(at + "q_norm.weight"), ld(at + "k_norm.weight")
            if a.is_sparse(l):
                layer.update(load_experts(src, p, m.num_experts, fam, dtype, device))
                if a.shared_size:
                    sh = p + "mlp.shared_expert."
                    layer["shared_w13"] = torch.cat([ld(sh + "gate_proj.weight"), ld(sh + "up_proj.weight")])
                    layer["shared_w2"] = ld(sh + "down_proj.weight")  # (H, IS)
                    layer["shared_gate"] = ld(p + "mlp.shared_expert_gate.weight")  # (1, H)
            else:  # a dense-MLP layer
                layer["mlp_w13"] = torch.cat([ld(p + "mlp.gate_proj.weight"), ld(p + "mlp.up_proj.weight")])
                layer["mlp_w2"] = ld(p + "mlp.down_proj.weight")  # (H, ID)
            m.layers.append(layer)
        src.close()
        return m

    @classmethod
    def random(cls, config: dict, dtype, device, seed: int = 0, std: float = 0.02) -> MoeForServing:
        """Random weights directly on the device (`--load-format dummy`, benchmarks; no checkpoint)."""
        m = cls(config, dtype, device)
        a = m.arch
        g = torch.Generator(device=device).manual_seed(seed)
        rn = lambda *s: (torch.randn(*s, generator=g, device=device, dtype=dtype) * std)  # noqa: E731
        one = lambda n: torch.ones(n, device=device, dtype=dtype)  # noqa: E731
        H, E, D, I = m.hidden, m.num_experts, m.head_dim, a.expert_size
        qd, kvd = m.num_heads * D, m.num_kv_heads * D
        m.embed, m.norm = rn(m.vocab, H), one(H)
        m.lm_head = m.embed if a.tie_word_embeddings else rn(m.vocab, H)
        for l in range(m.num_layers):
            layer = {"in_norm": one(H), "post_norm": one(H), "qkv": rn(qd + 2 * kvd, H), "o": rn(H, qd)}
            if "q" in a.attn_bias:
                layer["qkv_bias"] = rn(qd + 2 * kvd)
            if "o" in a.attn_bias:
                layer["o_bias"] = rn(H)
            if a.family.qk_norm == "full":
                layer["q_norm"], layer["k_norm"] = one(qd), one(kvd)
            elif a.family.qk_norm == "head":
                layer["q_norm"], layer["k_norm"] = one(D), one(D)
            if a.is_sparse(l):
                layer |= {"router": rn(E, H), "w13": rn(E, 2 * I, H), "w2": rn(E, H, I)}
                if a.shared_size:
                    S = a.shared_size
                    layer |= {"shared_w13": rn(2 * S, H), "shared_w2": rn(H, S), "shared_gate": rn(1, H)}
            else:
                layer |= {"mlp_w13": rn(2 * a.dense_size, H), "mlp_w2": rn(H, a.dense_size)}
            m.layers.append(layer)
        return m

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids (T,) -> final hidden states (T, H)."""
        x = self.embed[input_ids]  # (T, H)
        ctx.dense_lora_align = None  # computed by the first attention / shared-expert LoRA of this forward
        residual = None  # the residual stream; add_rms_norm_ adds each sublayer's output in place
        for l, w in enumerate(self.layers):
            if residual is None:
                residual, h = x, rms_norm(x, w["in_norm"], self.eps)
            else:
                h = add_rms_norm_(x, residual, w["in_norm"], self.eps)
            x = self.attention(l, w, h, ctx)
            h = add_rms_norm_(x, residual, w["post_norm"], self.eps)
            # (T, K, H) fp32 routing-weighted expert outputs (summed by the next norm), or (T, H)
            x = self.moe(l, w, h, ctx) if "router" in w else self.dense_mlp(w, h)
        return add_rms_norm_(x, residual, self.norm, self.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head.T).float()  # (N, V) fp32

    def attention(self, l, w, h, ctx: ForwardContext) -> torch.Tensor:
        T = h.shape[0]
        QH, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = h @ w["qkv"].T  # (T, QH*D + 2*KVH*D)
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"]
        if ctx.lora is not None:  # q, k, v deltas into their columns of qkv: one shrink, one expand
            parts = [(ctx.lora.dense(l, p), c) for p, c in (("q_proj", 0), ("k_proj", QH * D), ("v_proj", (QH + KVH) * D))]
            dense_lora_cols_(qkv, h, parts, ctx.slot_ids, self._dense_align(parts, ctx))
        k_cache, v_cache = self.kv_caches[l]
        # q/k RMSNorm (over the full projection width: (QH*D,) weights; per head: (D,) weights;
        # none), clip, RoPE, and k/v into the paged cache, in one launch
        q = attention_input(qkv, w.get("q_norm"), w.get("k_norm"), self.eps, self.cos, self.sin, ctx.positions,
                            k_cache, v_cache, ctx.slot_mapping, QH, KVH, D, self.clip_qkv)  # (T, QH, D)
        nd = ctx.num_decode
        if ctx.prefill is None:  # decode only: every row is a decode row
            out = paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale)
        else:
            out = torch.empty_like(q)  # (T, QH, D)
            if nd:  # written in place: rows [0, nd)
                paged_decode_attention(q[:nd], k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale,
                                       out=out[:nd])
            pf = ctx.prefill  # every chunk in one launch, over its cached prefix and itself
            paged_prefill_attention(q, k_cache, v_cache, pf.block_tables, pf.cu_q, pf.context_lens, pf.max_q_len,
                                    self.scale, out=out)
        out = out.reshape(T, QH * D)
        y = out @ w["o"].T
        if "o_bias" in w:
            y = y + w["o_bias"]
        if ctx.lora is not None:
            dl = ctx.lora.dense(l, "o_proj")
            if dl is not None:
                dense_lora_(y, out, dl, ctx.slot_ids, self._dense_align([(dl, 0)], ctx))
        return y

    @staticmethod
    def _dense_align(parts, ctx: ForwardContext):
        """The step's token alignment by slot, made once per forward when dense LoRA runs."""
        if ctx.dense_lora_align is None and any(p[0] is not None for p in parts):
            ctx.dense_lora_align = dense_lora_plan(ctx.slot_ids, ctx.lora.num_slots)
        return ctx.dense_lora_align

    def moe(self, l, w, h, ctx: ForwardContext) -> torch.Tensor:
        """(T, K, H) fp32 routing-weighted expert outputs (their sum is the layer's output); with a
        shared expert, the (T, H) sum of both."""
        logits = h @ w["router"].T  # (T, E)
        for slot, rows in ctx.router_groups:  # adapters with their own router weights
            logits[rows] = h[rows] @ ctx.lora.router[l][slot].T
        # fp32 softmax, top-k, renormalised if norm_topk_prob, weights rounded to the model dtype
        # as transformers does (Mixtral keeps them fp32)
        topk_w, topk_ids = route_topk(logits, self.top_k, self.norm_topk,
                                      round_weights=self.arch.family.cast_routing)  # (T, K) fp32, int32
        lora = ctx.lora.moe_layer(l) if ctx.lora is not None else None
        shared = "shared_w13" in w
        out = fused_moe(h, w["w13"], w["w2"], topk_w, topk_ids, lora, ctx.slot_ids if lora is not None else None,
                        combine=shared)
        if shared:
            out = out + self.shared_expert(l, w, h, ctx)
        return out

    def shared_expert(self, l, w, h, ctx: ForwardContext) -> torch.Tensor:
        """Qwen2-MoE: sigmoid(h @ g) * down(silu(gate(h)) * up(h)), with optional dense LoRA."""
        S = w["shared_w2"].shape[1]
        gu = h @ w["shared_w13"].T  # (T, 2*IS)
        if ctx.lora is not None:  # gate and up deltas into their columns: one shrink, one expand
            parts = [(ctx.lora.dense(l, "shared_gate"), 0), (ctx.lora.dense(l, "shared_up"), S)]
            dense_lora_cols_(gu, h, parts, ctx.slot_ids, self._dense_align(parts, ctx))
        act = F.silu(gu[:, :S]) * gu[:, S:]  # (T, IS)
        y = act @ w["shared_w2"].T  # (T, H)
        if ctx.lora is not None:
            dl = ctx.lora.dense(l, "shared_down")
            if dl is not None:
                dense_lora_(y, act, dl, ctx.slot_ids, self._dense_align([(dl, 0)], ctx))
        return torch.sigmoid(h @ w["shared_gate"].T) * y

    def dense_mlp(self, w, h) -> torch.Tensor:
        """A Qwen MoE dense-MLP layer (no experts, no LoRA)."""
        ID = w["mlp_w2"].shape[1]
        gu = h @ w["mlp_w13"].T  # (T, 2*ID)
        return (F.silu(gu[:, :ID]) * gu[:, ID:]) @ w["mlp_w2"].T


def load_experts(src: WeightSource, prefix: str, num_experts: int, fam, dtype, device) -> dict[str, torch.Tensor]:
    """Router (E, H) and stacked experts w13 (E, 2I, H) / w2 (E, H, I) of one layer, from the
    v5 fused keys or the hub's per-expert keys (the family's names)."""
    ld = lambda n: src.load(n, dtype, device)  # noqa: E731
    moe = prefix + "mlp."
    if moe + "experts.gate_up_proj" in src:  # transformers v5 fused layout
        return {"router": ld(moe + "gate.weight"), "w13": ld(moe + "experts.gate_up_proj"),
                "w2": ld(moe + "experts.down_proj")}
    hub = prefix + fam.hub_moe + "."
    gate, up, down = fam.hub_experts
    router = moe + "gate.weight" if moe + "gate.weight" in src else hub + "gate.weight"
    return {"router": ld(router),
            "w13": src.stack_experts(hub + "experts", num_experts, [gate, up], dtype, device),
            "w2": src.stack_experts(hub + "experts", num_experts, [down], dtype, device)}
