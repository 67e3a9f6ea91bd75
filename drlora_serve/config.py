"""Engine configuration (flags use vLLM's names where vLLM has one)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineArgs:
    model: str = "tiny"  # resolved by drlora.models.resolve_model
    served_model_name: str | None = None  # name of the base model in the API (default: model)
    adapters_dir: str | None = None  # each subfolder one adapter, named after it
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> path
    max_loras: int = 16  # adapters resident in the device pool at once
    max_cpu_loras: int = 64  # adapters kept in host memory (LRU)
    max_lora_rank: int = 256  # largest per-expert rank accepted
    lora_pool_rank_rows: int | None = None  # pool size in rank rows per (layer, projection)
    # (default: max_loras * num_experts * 16)
    lora_dense_rank_rows: int | None = None  # same for attention LoRA pools (default: max_loras * 64)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available else cpu
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides the memory-fraction sizing (CPU default: kv_cache.CPU_DEFAULT_BLOCKS)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # decode batch sizes captured at start-up (vLLM's name; default: cuda_graphs.DEFAULT_SIZES up
    # to max_num_seqs, plus max_num_seqs itself)
    cuda_graph_sizes: list[int] | None = None
    # a CUDA graph capture failure raises (the engine does not start) instead of logging an error
    # and running eagerly; also DRLORA_STRICT_CUDA_GRAPHS=1
    strict_cuda_graphs: bool = False
    seed: int = 0
    load_format: str = "auto"  # auto: safetensors from the model folder; dummy: random weights
    # of the config's shape (vLLM's name; benchmarks at real shapes without the checkpoint)
    model_class: str | None = None  # `module:Class` instead of the registry's class for the model_type
    async_scheduling: bool = True  # schedule step N+1 while step N runs (one step of lookahead)
    stats_interval: float = 0.05  # seconds between the engine core's stats messages
    # torch threads of the engine core process on CPU (None: every core but one, which the
    # API server process needs; intra-op threads fighting it for a core cost far more than
    # they give on small steps)
    cpu_threads: int | None = None
