"""OLMoE written for serving: flattened tokens of many sequences, paged KV cache, per-token
adapter slots (rank-exact expert LoRA, optional attention LoRA, optional per-adapter router).

Legend: T tokens, B sequences, H hidden, I expert intermediate, E experts, K top-k,
QH/KVH query/kv heads, D head dim, V vocab, L context length.
Matches transformers' OlmoeForCausalLM: q_norm/k_norm are RMSNorms over the full q/k
projection width (before the head split), default RoPE (rotate-half), router softmax in fp32
then top-k (renormalised when norm_topk_prob).
"""

from __future__ import annotations

import torch

from kernels import (add_rms_norm_, attention_input, dense_lora_, dense_lora_cols_, dense_lora_plan, fused_moe,
                     paged_decode_attention, paged_prefill_attention, rms_norm, route_topk)

from drlora_serve.context import ForwardContext
from drlora_serve.weights import WeightSource


class OlmoeForServing:
    def __init__(self, config: dict, dtype: torch.dtype, device: torch.device):
        c = config
        self.config, self.dtype, self.device = c, dtype, device
        self.num_layers = c["num_hidden_layers"]
        self.hidden = c["hidden_size"]
        self.num_heads = c["num_attention_heads"]
        self.num_kv_heads = c.get("num_key_value_heads") or self.num_heads
        self.head_dim = c.get("head_dim") or self.hidden // self.num_heads
        self.num_experts = c["num_experts"]
        self.top_k = c["num_experts_per_tok"]
        self.norm_topk = bool(c.get("norm_topk_prob", False))
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.clip_qkv = c.get("clip_qkv")
        self.vocab = c["vocab_size"]
        self.max_positions = c.get("max_position_embeddings", 4096)
        rope = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 10000.0), "rope_type": "default"}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (default RoPE only)")
        d = self.head_dim
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device, dtype)  # (maxpos, D)
        self.sin = emb.sin().to(device, dtype)
        self.scale = d ** -0.5
        self.layers: list[dict[str, torch.Tensor]] = []
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # set by the runner

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir, config: dict, dtype, device) -> OlmoeForServing:
        m = cls(config, dtype, device)
        src = WeightSource(model_dir)
        ld = lambda n: src.load(n, dtype, device)  # noqa: E731
        m.embed = ld("model.embed_tokens.weight")
        m.norm = ld("model.norm.weight")
        m.lm_head = ld("lm_head.weight") if "lm_head.weight" in src else m.embed
        for l in range(m.num_layers):
            p = f"model.layers.{l}."
            q, k, v = (ld(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            layer = {
                "in_norm": ld(p + "input_layernorm.weight"),
                "post_norm": ld(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([q, k, v], 0).contiguous(),  # (QH*D + 2*KVH*D, H)
                "o": ld(p + "self_attn.o_proj.weight"),
                "q_norm": ld(p + "self_attn.q_norm.weight"),
                "k_norm": ld(p + "self_attn.k_norm.weight"),
                "router": ld(p + "mlp.gate.weight"),  # (E, H)
            }
            del q, k, v
            if p + "mlp.experts.gate_up_proj" in src:  # transformers v5 fused layout
                layer["w13"] = ld(p + "mlp.experts.gate_up_proj")  # (E, 2I, H)
                layer["w2"] = ld(p + "mlp.experts.down_proj")  # (E, H, I)
            else:  # hub per-expert layout
                ex = p + "mlp.experts"
                layer["w13"] = src.stack_experts(ex, m.num_experts, ["gate_proj", "up_proj"], dtype, device)
                layer["w2"] = src.stack_experts(ex, m.num_experts, ["down_proj"], dtype, device)
            m.layers.append(layer)
        src.close()
        return m

    @classmethod
    def random(cls, config: dict, dtype, device, seed: int = 0, std: float = 0.02) -> OlmoeForServing:
        """Random weights directly on the device (benchmarks; no checkpoint)."""
        m = cls(config, dtype, device)
        g = torch.Generator(device=device).manual_seed(seed)
        rn = lambda *s: (torch.randn(*s, generator=g, device=device, dtype=dtype) * std)  # noqa: E731
        one = lambda n: torch.ones(n, device=device, dtype=dtype)  # noqa: E731
        H, E, D = m.hidden, m.num_experts, m.head_dim
        I = config.get("intermediate_size")
        qd, kvd = m.num_heads * D, m.num_kv_heads * D
        m.embed, m.norm, m.lm_head = rn(m.vocab, H), one(H), rn(m.vocab, H)
        for _ in range(m.num_layers):
            m.layers.append({"in_norm": one(H), "post_norm": one(H), "qkv": rn(qd + 2 * kvd, H),
                             "o": rn(H, qd), "q_norm": one(qd), "k_norm": one(kvd), "router": rn(E, H),
                             "w13": rn(E, 2 * I, H), "w2": rn(E, H, I)})
        return m

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids (T,) -> final hidden states (T, H)."""
        x = self.embed[input_ids]  # (T, H)
        ctx.dense_lora_align = None  # computed by the first attention LoRA of this forward
        residual = None  # the residual stream; add_rms_norm_ adds each sublayer's output in place
        for l, w in enumerate(self.layers):
            if residual is None:
                residual, h = x, rms_norm(x, w["in_norm"], self.eps)
            else:
                h = add_rms_norm_(x, residual, w["in_norm"], self.eps)
            x = self.attention(l, w, h, ctx)
            h = add_rms_norm_(x, residual, w["post_norm"], self.eps)
            x = self.moe(l, w, h, ctx)  # (T, K, H) fp32 weighted expert outputs, summed by the next norm
        return add_rms_norm_(x, residual, self.norm, self.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head.T).float()  # (N, V) fp32

    def attention(self, l, w, h, ctx: ForwardContext) -> torch.Tensor:
        T = h.shape[0]
        QH, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = h @ w["qkv"].T  # (T, QH*D + 2*KVH*D)
        if ctx.lora is not None:  # q, k, v deltas into their columns of qkv: one shrink, one expand
            parts = [(ctx.lora.dense(l, p), c) for p, c in (("q_proj", 0), ("k_proj", QH * D), ("v_proj", (QH + KVH) * D))]
            dense_lora_cols_(qkv, h, parts, ctx.slot_ids, self._dense_align(parts, ctx))
        k_cache, v_cache = self.kv_caches[l]
        # q/k RMSNorm over the full projection width, clip, RoPE, and k/v into the paged cache
        q = attention_input(qkv, w["q_norm"], w["k_norm"], self.eps, self.cos, self.sin, ctx.positions, k_cache,
                            v_cache, ctx.slot_mapping, QH, KVH, D, self.clip_qkv)  # (T, QH, D)
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
        if ctx.lora is not None:
            dl = ctx.lora.dense(l, "o_proj")
            if dl is not None:
                dense_lora_(y, out, dl, ctx.slot_ids, self._dense_align([(dl, 0)], ctx))
        return y

    @staticmethod
    def _dense_align(parts, ctx: ForwardContext):
        """The step's token alignment by slot, made once per forward when attention LoRA runs."""
        if ctx.dense_lora_align is None and any(p[0] is not None for p in parts):
            ctx.dense_lora_align = dense_lora_plan(ctx.slot_ids, ctx.lora.num_slots)
        return ctx.dense_lora_align

    def moe(self, l, w, h, ctx: ForwardContext) -> torch.Tensor:
        """(T, K, H) fp32 routing-weighted expert outputs (their sum is the layer's output)."""
        logits = h @ w["router"].T  # (T, E)
        for slot, rows in ctx.router_groups:  # adapters with their own router weights
            logits[rows] = h[rows] @ ctx.lora.router[l][slot].T
        # fp32 softmax, top-k, renormalised if norm_topk_prob, weights rounded to the model dtype
        topk_w, topk_ids = route_topk(logits, self.top_k, self.norm_topk)  # (T, K) fp32, int32
        lora = ctx.lora.moe_layer(l) if ctx.lora is not None else None
        return fused_moe(h, w["w13"], w["w2"], topk_w, topk_ids, lora, ctx.slot_ids if lora is not None else None,
                         combine=False)
