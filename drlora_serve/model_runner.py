"""Model runner: owns the model, the KV cache and the LoRA pool buffers; turns a scheduled
batch into flat tensors and a ForwardContext, launches the forward and the sampler, and hands
back a LaunchedStep whose results are read only when the step is waited on.

Legend: T tokens, B decode sequences, C prefill chunks, N sampled rows, V vocab, K logprobs,
MAXB blocks per sequence.
One code path on every device: the kernels dispatch (Triton on CUDA, torch twins on CPU).
Decode-only steps on CUDA replay CUDA graphs captured at start-up per padded batch size and
LoRA layout (cuda_graphs.py); `graph_stats` counts replayed vs eager decode-only steps.

Asynchronous by construction: on CUDA `launch` enqueues the step and returns; the host reads
the sampled tokens only in `LaunchedStep.wait()`. A decode whose input token is still in
flight (sampled by the previous step, not yet read by the host) takes it from that step's
token tensor on the device. Step inputs are built vectorised from persistent host buffers
(pinned on CUDA, two sets used alternately so a copy still in flight is never overwritten).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from drlora.models import MoeShape

from drlora_serve.config import EngineArgs
from drlora_serve.context import ForwardContext, PrefillBatch
from drlora_serve.cuda_graphs import DecodeGraphs, GraphStats
from drlora_serve.kv_cache import CPU_DEFAULT_BLOCKS, KVCache, bytes_per_block, num_blocks_for_memory
from drlora_serve.lora_buffers import LoraBuffers
from drlora_serve.models.registry import get_model_class, load_model_class
from drlora_serve.logits_processors import SamplingState, min_tokens_pairs, needs_state
from drlora_serve.sampler import Sampler, SamplerOutput, SamplingBatch, StepExtras, build_sampling_batch
from drlora_serve.scheduler import ScheduledBatch
from drlora_serve.sequence import Sequence
from drlora_serve.weights import torch_dtype


@dataclass
class StepResult:
    """A step's results on the host."""

    tokens: list[int]  # one per sampled row
    logprob: list[float] | None = None  # the chosen token's, per row
    rank: list[int] | None = None  # the chosen token's rank, per row
    top_ids: list[list[int]] | None = None  # (N, K)
    top_logprobs: list[list[float]] | None = None
    # per prompt chunk asking prompt logprobs: (seq, first predicted position, logprobs of the
    # next prompt tokens, top ids, top logprobs, ranks of the prompt tokens)
    prompt: list[tuple[Sequence, int, list[float], list[list[int]], list[list[float]], list[int]]] = \
        field(default_factory=list)


@dataclass
class LaunchedStep:
    step_id: int
    sample_seqs: list[Sequence]  # row i of the samples -> its sequence
    end_seqs: list[Sequence]  # chunks that computed a sequence's last token without sampling
    chunk_seqs: list[Sequence]  # the other prefill chunks that do not sample
    sampled: SamplerOutput | None  # device tensors (None: sampling not launched yet)
    sample_logits: torch.Tensor | None  # (N, V) fp32 (kept for tests and debugging)
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]]  # (seq, first position, (m, V) logits)
    prompt_lp: list[tuple[Sequence, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]]
    sampling: SamplingBatch | None = None
    host_tokens: torch.Tensor | None = None  # (N,) copy on the host (pinned on CUDA)
    host_lp: tuple | None = None
    event: object | None = None  # completion event (None: already complete)

    def wait(self) -> StepResult:
        """Block until the step's results are on the host; read them."""
        if self.event is not None:
            self.event.synchronize()
        n = len(self.sample_seqs)
        res = StepResult(self.host_tokens[:n].tolist() if n else [])
        if self.host_lp is not None:
            lp, rk, ti, tv = self.host_lp
            res.logprob, res.rank = lp[:n].tolist(), rk[:n].tolist()
            if ti is not None:
                res.top_ids, res.top_logprobs = ti[:n].tolist(), tv[:n].tolist()
        for seq, start, lp, ti, tv, rk in self.prompt_lp:
            res.prompt.append((seq, start, lp.tolist(), ti.tolist() if ti is not None else None,
                               tv.tolist() if tv is not None else None, rk.tolist()))
        return res


class HostBuffers:
    """One set of persistent step inputs on the host (pinned on CUDA): a step's int64 inputs
    are packed one after another into `i64`, its int32 inputs into `i32`, and each reaches the
    device in one copy (views of it are the step's tensors)."""

    def __init__(self, n64: int, n32: int, pin: bool):
        self.i64 = torch.zeros(n64, dtype=torch.int64, pin_memory=pin)
        self.i32 = torch.zeros(n32, dtype=torch.int32, pin_memory=pin)
        self.n64, self.n32 = self.i64.numpy(), self.i32.numpy()


class ModelRunner:
    def __init__(self, args: EngineArgs, model_dir, model=None, config: dict | None = None):
        self.args = args
        dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.dtype = torch_dtype(args.dtype, self.device)
        self.config = config if config is not None else json.loads((model_dir / "config.json").read_text())
        cls = load_model_class(args.model_class) if args.model_class else \
            get_model_class(self.config.get("model_type", "olmoe"))
        if model is None and args.load_format == "dummy":
            model = cls.random(self.config, self.dtype, self.device, seed=args.seed)
        elif model is None and args.load_format != "auto":
            raise ValueError(f"unknown load_format {args.load_format!r} (auto or dummy)")
        self.model = model if model is not None else cls.from_pretrained(model_dir, self.config, self.dtype, self.device)
        # refused as vLLM does, before the LoRA pool and the KV cache are allocated
        if args.max_model_len and args.max_model_len > self.model.max_positions:
            raise ValueError(f"max_model_len {args.max_model_len} is more than the model's "
                             f"{self.model.max_positions} positions (max_position_embeddings)")
        self.max_model_len = args.max_model_len or self.model.max_positions
        self.shape = MoeShape.from_config(self.config)
        self.vocab_size = self.config["vocab_size"]
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
        self.max_blocks_per_seq = -(-self.max_model_len // args.block_size)
        self.sampler = Sampler(self.device, args.seed)
        self.sampling_state = SamplingState(args.max_num_seqs, self.vocab_size, self.device)
        # persistent host state: two input buffer sets, a block-table mirror per sequence row
        pin = self.device.type == "cuda"
        T, S, MB = args.max_num_batched_tokens + args.max_num_seqs, args.max_num_seqs, self.max_blocks_per_seq
        n64 = 3 * T + 2 * S + 2 * T  # ids, pos, slots | sample rows | gathers
        n32 = T + S + 2 * S * MB + 2 * S + 2  # adapter slots, lens, decode + prefill tables, cu, context lens
        self._bufs = [HostBuffers(n64, n32, pin), HostBuffers(n64, n32, pin)]
        self._out_host = [torch.zeros(S + T, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._tables = np.zeros((S, MB), dtype=np.int32)  # row -> block table
        self._table_len = np.zeros(S, dtype=np.int64)  # entries mirrored per row
        self._row_slot = np.full(S, -1, dtype=np.int32)  # row -> adapter slot (fixed while running)
        self._free_rows = list(range(S - 1, -1, -1))
        self._step_id = 0
        self._prev: LaunchedStep | None = None
        self._sampling_key: tuple | None = None
        self._sampling: SamplingBatch | None = None
        self.graph_stats = GraphStats()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not args.enforce_eager:
            self.graphs = DecodeGraphs(self, args.max_num_seqs, args.cuda_graph_sizes, args.max_lora_rank,
                                       args.strict_cuda_graphs, self.graph_stats)
            self.graphs.capture_all()  # at start-up, never inside a served (or timed) step

    def _activation_reserve(self) -> int:
        """Peak extra memory of the largest step: logits and MoE intermediates (estimate)."""
        s, a = self.shape, self.args
        T, V = a.max_num_batched_tokens, self.config["vocab_size"]
        k = self.config.get("num_experts_per_tok", 8)
        per_tok = 4 * (V + k * (2 * s.intermediate_size + s.hidden_size)) + 16 * s.hidden_size
        return T * per_tok + (512 << 20)

    # ------------------------------------------------------------------ rows
    def release(self, seq: Sequence) -> None:
        """The sequence left the running batch (finished or preempted): free its row."""
        if seq.row >= 0:
            self._table_len[seq.row] = 0
            self._free_rows.append(seq.row)
            seq.row = -1

    def _row(self, seq: Sequence) -> int:
        """seq's row, with its block table mirrored into self._tables."""
        r = seq.row
        if r < 0:
            r = seq.row = self._free_rows.pop()
            v = seq.request.adapter_version
            self._row_slot[r] = v.slot if v is not None else -1
            if needs_state(seq):  # penalties / bad words: the row's past on the device
                self.sampling_state.admit(r, seq)
        bt = seq.block_table
        n = self._table_len[r]
        if len(bt) != n:
            self._tables[r, n:len(bt)] = bt[n:]
            self._table_len[r] = len(bt)
        return r

    # ------------------------------------------------------------------ inputs
    def prepare(self, batch: ScheduledBatch, buf: HostBuffers):
        """Fill `buf` and build the step's tensors on the device: (input_ids, ctx, sample_rows,
        gather (dst, src) or None). Token order: decodes, then prefill chunks.
        int64 layout: ids, pos, slots (T each), sample rows (N), gather dst, gather src (G each);
        int32: adapter slots (T), decode lens (B), decode tables (B, MAXB), then for prefill chunks
        cu_q (C + 1), context lens (C), tables (C, MAXB)."""
        bs = self.block_size
        decodes, prefills = batch.decodes, batch.prefills
        B = len(decodes)
        T = B + sum(c.num_tokens for c in prefills)
        i64, i32 = buf.n64, buf.n32
        ids, pos_, slots = i64[:T], i64[T:2 * T], i64[2 * T:3 * T]
        adapters = i32[:T]
        # decodes: one token each, at position num_computed - 1 (the scheduler advanced it)
        maxb = 0
        gather_dst = gather_src = None
        if B:
            r = np.array([s.row for s in decodes], dtype=np.int64)
            pos = np.array([s.num_computed_tokens for s in decodes], dtype=np.int64) - 1
            stale = np.nonzero((r < 0) | (pos // bs >= self._table_len[r]))[0]  # new rows, new blocks
            if len(stale):
                r[stale] = [self._row(decodes[i]) for i in stale.tolist()]
            pos_[:B] = pos
            slots[:B] = self._tables[r, pos // bs] * bs + pos % bs
            maxb = int(self._table_len[r].max())
            i32[T:T + B] = pos + 1  # context lens
            i32[T + B:T + B + B * maxb] = self._tables[r, :maxb].reshape(-1)
            adapters[:B] = self._row_slot[r]
            # the input token: known on the host, or still in flight (the previous step sampled it)
            inflight = pos >= np.array([len(s.token_ids) for s in decodes], dtype=np.int64)
            if inflight.all():
                gather_dst = np.arange(B)
                gather_src = np.array([s.sample_row for s in decodes], dtype=np.int64)
            else:
                known = np.nonzero(~inflight)[0].tolist()
                ids[known] = [decodes[i].token_ids[p] for i, p in zip(known, pos[known].tolist())]
                if inflight.any():
                    gather_dst = np.nonzero(inflight)[0]
                    gather_src = np.array([decodes[i].sample_row for i in gather_dst.tolist()], dtype=np.int64)
        o32 = T + B + B * maxb  # the prefill part of i32 starts here
        # prefill chunks (host-known tokens; a token still in flight is gathered like a decode's)
        C = len(prefills)
        sample_rows = list(range(B))
        if C:
            gather = []
            cu = i32[o32:o32 + C + 1]
            cu[0] = t = B
            for c, ch in enumerate(prefills):
                s, start, n = ch.seq, ch.start, ch.num_tokens
                self._row(s)
                p = np.arange(start, start + n, dtype=np.int64)
                toks = s.token_ids[start:start + n]
                if len(toks) < n:  # the last token is in flight
                    gather.append((t + n - 1, s.sample_row))
                    toks = toks + [-1]
                ids[t:t + n] = toks
                pos_[t:t + n] = p
                slots[t:t + n] = self._tables[s.row, p // bs] * bs + p % bs
                v = s.request.adapter_version
                adapters[t:t + n] = v.slot if v is not None else -1
                t += n
                cu[c + 1] = t
                if ch.samples:
                    sample_rows.append(t - 1)
            i32[o32 + C + 1:o32 + 2 * C + 1] = [c.start + c.num_tokens for c in prefills]
            maxbp = max(len(c.seq.block_table) for c in prefills)
            i32[o32 + 2 * C + 1:o32 + 2 * C + 1 + C * maxbp] = \
                self._tables[[c.seq.row for c in prefills], :maxbp].reshape(-1)
            if gather:  # prefill chunks whose last token is in flight (rare)
                g = np.asarray(gather, dtype=np.int64)
                gather_dst = g[:, 0] if gather_dst is None else np.concatenate([gather_dst, g[:, 0]])
                gather_src = g[:, 1] if gather_src is None else np.concatenate([gather_src, g[:, 1]])
        N = len(sample_rows)
        i64[3 * T:3 * T + N] = sample_rows
        G = 0
        if gather_dst is not None:
            assert self._prev is not None, "a token in flight without a previous step"
            G = len(gather_dst)
            i64[3 * T + N:3 * T + N + G], i64[3 * T + N + G:3 * T + N + 2 * G] = gather_dst, gather_src
            ids[gather_dst] = 0  # placeholders, overwritten on the device
        n32 = o32 + (2 * C + 1 + C * maxbp if C else 0)
        # two copies to the device; the step's tensors are views of them
        d64 = buf.i64[:3 * T + N + 2 * G].to(self.device, non_blocking=True)
        d32 = buf.i32[:n32].to(self.device, non_blocking=True)
        ctx = ForwardContext(positions=d64[T:2 * T], slot_mapping=d64[2 * T:3 * T], slot_ids=d32[:T], num_decode=B)
        if B:
            ctx.context_lens = d32[T:T + B]
            ctx.block_tables = d32[T + B:T + B + B * maxb].view(B, maxb)
        if C:
            ctx.prefill = PrefillBatch(
                cu_q=d32[o32:o32 + C + 1], context_lens=d32[o32 + C + 1:o32 + 2 * C + 1],
                block_tables=d32[o32 + 2 * C + 1:o32 + 2 * C + 1 + C * maxbp].view(C, maxbp),
                max_q_len=max(c.num_tokens for c in prefills))
        used = adapters >= 0
        if used.any():
            ctx.lora = self.lora
            for slot in np.unique(adapters[used]).tolist():
                if self.lora.has_router[slot]:
                    ctx.router_groups.append((slot, torch.from_numpy(np.nonzero(adapters == slot)[0]).to(self.device)))
        gather_t = (d64[3 * T + N:3 * T + N + G], d64[3 * T + N + G:3 * T + N + 2 * G]) if G else None
        return d64[:T], ctx, d64[3 * T:3 * T + N], gather_t

    # ------------------------------------------------------------------ run
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Enqueue the step (forward, logits, sampling, copies to the host); return at once."""
        self._step_id += 1
        buf = self._bufs[self._step_id % 2]
        input_ids, ctx, sample_rows, gather = self.prepare(batch, buf)
        if gather is not None:
            input_ids[gather[0]] = self._prev.sampled.tokens[gather[1]]
        hidden = None
        decode_only = bool(batch.decodes) and not batch.prefills
        if self.graphs is not None and decode_only and not ctx.router_groups:
            hidden = self.graphs.run(input_ids, ctx)
        if decode_only:
            if hidden is not None:
                self.graph_stats.replays += 1
            else:
                self.graph_stats.eager_decode_steps += 1
        if hidden is None:
            hidden = self.model.forward(input_ids, ctx)
        sample_seqs = list(batch.decodes) + [c.seq for c in batch.prefills if c.samples]
        end_seqs, chunk_seqs = [], []
        for c in batch.prefills:
            if not c.samples:
                (end_seqs if c.start + c.num_tokens == c.seq.num_tokens else chunk_seqs).append(c.seq)
        for i, s in enumerate(sample_seqs):
            s.sample_row = i
        step = LaunchedStep(self._step_id, sample_seqs, end_seqs, chunk_seqs, None, None, [], [])
        if sample_seqs:
            step.sample_logits = self.model.compute_logits(hidden[sample_rows])
            key = tuple(s.key for s in sample_seqs)
            if key != self._sampling_key:  # decode steps usually repeat the batch
                self._sampling_key, self._sampling = key, build_sampling_batch(sample_seqs, self.vocab_size, self.device)
            step.sampling = self._sampling
        self._prompt_logprobs(batch, hidden, step)
        self._prev = step
        if step.sampling is None or step.sampling.constrained is None:
            self.sample(step)
        # else: the core fills the grammar masks once the previous step's tokens are known,
        # while this forward runs, then calls sample()
        return step

    @torch.inference_mode()
    def sample(self, step: LaunchedStep, bitmask: torch.Tensor | None = None,
               skip_min_tokens: set[int] | None = None) -> None:
        """Enqueue the step's sampling and the copies of its results to the host.
        bitmask: (Nc, W32) int32 host masks of the constrained rows (SamplingBatch.constrained);
        skip_min_tokens: rows whose grammar allows only its end (the grammar wins)."""
        b, n = step.sampling, len(step.sample_seqs)
        if n:
            extras = None
            mt = min_tokens_pairs(b.controls, skip_min_tokens) if b.controls is not None else None
            if bitmask is not None or mt is not None:
                dev = self.device
                extras = StepExtras()
                if mt is not None:
                    extras.min_tokens = (torch.tensor(mt[0], dtype=torch.long, device=dev),
                                         torch.tensor(mt[1], dtype=torch.long, device=dev))
                if bitmask is not None:
                    extras.grammar_rows = b.constrained_rows
                    extras.bitmask = bitmask if dev.type == "cpu" else bitmask.to(dev, non_blocking=True)
            sampled = self.sampler(step.sample_logits, b, self.sampling_state, extras)
        else:
            sampled = SamplerOutput(torch.empty(0, dtype=torch.long, device=self.device))
        step.sampled = sampled
        host = self._out_host[step.step_id % 2]
        step.host_tokens = host[:n]
        step.host_tokens.copy_(sampled.tokens, non_blocking=True)
        if sampled.logprob is not None:
            step.host_lp = tuple(t.to("cpu", non_blocking=True) if t is not None else None
                                 for t in (sampled.logprob, sampled.rank, sampled.top_ids, sampled.top_logprobs))
        step.event = self._record_event()

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor, step: LaunchedStep) -> None:
        """Logprobs of the prompt tokens each chunk predicts, for requests that asked."""
        row = len(batch.decodes)
        for ch in batch.prefills:
            s, start, n = ch.seq, ch.start, ch.num_tokens
            # row start + j predicts position start + j + 1; positions already sent (a chunk
            # recomputed after preemption) are not sent again
            first = max(start + 1, s.num_scored_prompt)
            last = min(start + n, s.num_prompt_tokens - 1)
            if s.wants_prompt_logprobs and first <= last:
                r0 = row + first - 1 - start
                m = last - first + 1
                logits = self.model.compute_logits(hidden[r0:r0 + m])
                lp = torch.log_softmax(logits, dim=-1)
                nxt = torch.tensor(s.token_ids[first:last + 1], dtype=torch.long, device=lp.device)
                k = s.request.params.prompt_logprobs
                top = torch.topk(lp, k, dim=-1) if k else None
                chosen = lp.gather(1, nxt[:, None])  # (m, 1)
                rank = (lp >= chosen).sum(dim=1)  # vLLM's rank: tokens at least as likely, itself included
                step.prompt_logits.append((s, first - 1, logits))
                step.prompt_lp.append((s, first, chosen.squeeze(1).cpu(),
                                       top.indices.cpu() if top is not None else None,
                                       top.values.cpu() if top is not None else None, rank.cpu()))
                s.num_scored_prompt = last + 1
            row += n

    def _record_event(self):
        # a model may supply its own completion events (benchmarks/host_overhead.py emulates an
        # asynchronous device that way)
        record = getattr(self.model, "record_event", None)
        if record is not None:
            return record()
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            return ev
        return None
