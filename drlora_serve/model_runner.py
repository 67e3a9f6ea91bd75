"""Model runner: owns the model, the KV cache and the LoRA pool buffers; turns a scheduled
batch into flat tensors and a ForwardContext, runs the forward and returns logits.

Legend: T tokens, B decode sequences, N rows needing logits, V vocab, MAXB blocks per seq.
One code path on every device: the kernels dispatch (Triton on CUDA, torch twins on CPU).
Decode-only steps on CUDA replay CUDA graphs captured per padded batch size (see cuda_graphs.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from drlora.models import MoeShape

from drlora_serve.config import EngineArgs
from drlora_serve.context import ForwardContext, PrefillBatch
from drlora_serve.kv_cache import CPU_DEFAULT_BLOCKS, KVCache, bytes_per_block, num_blocks_for_memory
from drlora_serve.lora_buffers import LoraBuffers
from drlora_serve.models.registry import get_model_class
from drlora_serve.scheduler import ScheduledBatch
from drlora_serve.sequence import Sequence
from drlora_serve.weights import torch_dtype


@dataclass
class StepLogits:
    sample_seqs: list[Sequence] = field(default_factory=list)
    sample_logits: torch.Tensor | None = None  # (N, V) fp32, one row per sample_seqs entry
    prompt_rows: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)  # (seq, first pos, logits)


class ModelRunner:
    def __init__(self, args: EngineArgs, model_dir, model=None, config: dict | None = None):
        self.args = args
        dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.dtype = torch_dtype(args.dtype, self.device)
        self.config = config if config is not None else json.loads((model_dir / "config.json").read_text())
        cls = get_model_class(self.config.get("model_type", "olmoe"))
        if model is None and args.load_format == "dummy":
            model = cls.random(self.config, self.dtype, self.device, seed=args.seed)
        elif model is None and args.load_format != "auto":
            raise ValueError(f"unknown load_format {args.load_format!r} (auto or dummy)")
        self.model = model if model is not None else cls.from_pretrained(model_dir, self.config, self.dtype, self.device)
        self.shape = MoeShape.from_config(self.config)
        s = self.shape
        moe_rows = args.lora_pool_rank_rows or max(args.max_loras, 1) * s.num_experts * 16
        dense_rows = args.lora_dense_rank_rows or max(args.max_loras, 1) * 64
        self.lora = LoraBuffers(s, max(args.max_loras, 1), moe_rows, dense_rows, self.dtype, self.device)
        self.block_size = args.block_size
        per_block = bytes_per_block(s.num_hidden_layers, args.block_size, s.num_key_value_heads, s.head_dim, self.dtype)
        if args.num_kv_blocks:
            nb = args.num_kv_blocks
        elif self.device.type == "cuda":
            reserve = self._activation_reserve()
            nb = num_blocks_for_memory(self.device, args.gpu_memory_utilization, per_block, reserve)
        else:
            nb = CPU_DEFAULT_BLOCKS
        self.kv = KVCache(s.num_hidden_layers, nb, args.block_size, s.num_key_value_heads, s.head_dim, self.dtype, self.device)
        self.model.kv_caches = self.kv.layers
        self.max_model_len = min(args.max_model_len or self.model.max_positions, self.model.max_positions)
        self.max_blocks_per_seq = -(-self.max_model_len // args.block_size)
        self.graphs = None
        if self.device.type == "cuda" and not args.enforce_eager:
            from drlora_serve.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, args.max_num_seqs)

    def _activation_reserve(self) -> int:
        """Peak extra memory of the largest step: logits and MoE intermediates (estimate)."""
        s, a = self.shape, self.args
        T, V = a.max_num_batched_tokens, self.config["vocab_size"]
        k = self.config.get("num_experts_per_tok", 8)
        per_tok = 4 * (V + k * (2 * s.intermediate_size + s.hidden_size)) + 16 * s.hidden_size
        return T * per_tok + (512 << 20)

    # ------------------------------------------------------------------ inputs
    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        decode = [(s, n) for s, n in batch.chunks if n == 1]
        prefill = [(s, n) for s, n in batch.chunks if n > 1]
        ids, pos, slots, adapters = [], [], [], []
        for s, n in decode + prefill:
            start = s.num_computed_tokens
            ids += s.token_ids[start:start + n]
            p = list(range(start, start + n))
            pos += p
            bt = s.block_table
            slots += [bt[i // bs] * bs + i % bs for i in p]
            v = s.request.adapter_version
            adapters += [v.slot if v is not None else -1] * n
        dev = self.device
        ctx = ForwardContext(positions=torch.tensor(pos, dtype=torch.long, device=dev),
                             slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                             slot_ids=torch.tensor(adapters, dtype=torch.int32, device=dev),
                             num_decode=len(decode))
        if decode:
            maxb = max(len(s.block_table) for s, _ in decode)
            tables = [s.block_table + [0] * (maxb - len(s.block_table)) for s, _ in decode]
            ctx.block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
            ctx.context_lens = torch.tensor([s.num_computed_tokens + 1 for s, _ in decode], dtype=torch.int32, device=dev)
        if prefill:
            maxb = max(len(s.block_table) for s, _ in prefill)
            cu = [len(decode)]
            for _, n in prefill:
                cu.append(cu[-1] + n)
            i32 = dict(dtype=torch.int32, device=dev)
            ctx.prefill = PrefillBatch(
                cu_q=torch.tensor(cu, **i32),
                context_lens=torch.tensor([s.num_computed_tokens + n for s, n in prefill], **i32),
                block_tables=torch.tensor([s.block_table + [0] * (maxb - len(s.block_table)) for s, _ in prefill], **i32),
                max_q_len=max(n for _, n in prefill))
        if any(a >= 0 for a in adapters):
            ctx.lora = self.lora
            for slot in sorted({a for a in adapters if a >= 0 and self.lora.has_router[a]}):
                rows = [i for i, a in enumerate(adapters) if a == slot]
                ctx.router_groups.append((slot, torch.tensor(rows, dtype=torch.long, device=dev)))
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx, decode + prefill

    # ------------------------------------------------------------------ run
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        input_ids, ctx, order = self.prepare(batch)
        sample_rows, prompt_rows, out = [], [], StepLogits()
        row = 0
        for s, n in order:
            start = s.num_computed_tokens
            if start + n == s.num_tokens:
                out.sample_seqs.append(s)
                sample_rows.append(row + n - 1)
            if s.wants_prompt_logprobs and start < s.num_prompt_tokens - 1:
                m = min(n, s.num_prompt_tokens - 1 - start)  # rows predicting prompt tokens
                prompt_rows.append((s, start, row, m))
            row += n
        hidden = None
        if self.graphs is not None and ctx.num_decode == len(order) and not ctx.router_groups:
            hidden = self.graphs.run(input_ids, ctx)
        if hidden is None:
            hidden = self.model.forward(input_ids, ctx)
        if sample_rows:
            out.sample_logits = self.model.compute_logits(hidden[sample_rows])
        for s, start, r, m in prompt_rows:
            out.prompt_rows.append((s, start, self.model.compute_logits(hidden[r:r + m])))
        return out
