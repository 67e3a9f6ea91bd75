"""Kernel launches per layer in one decode step, counted on the host (runs on any machine).

    python benchmarks/launch_count.py [--out launches.json] [--verbose] [--dense] [--host]
                                      [--layers N] [--device cuda] [--dtype float32]

What is counted, in one decode step (the model's forward) of the bundled tiny model at batch 8,
in bf16 by default (the GPU serving dtype: in fp32 the model's casts are no-ops), under
`torch.inference_mode()` as the model runner runs it, with every kernels/ op on its Triton path
(`DRLORA_FORCE_TRITON=1`; on a machine without CUDA the kernels run in the Triton interpreter,
`TRITON_INTERPRET=1`):
- every aten op the model issues (a `TorchDispatchMode`), except views, allocations and
  metadata queries, which launch nothing on a GPU (an op that may alias its input, such as
  `.to(dtype)` or `.contiguous()`, counts when it copied); aten ops issued *inside* a Triton launch
  (the interpreter moving tensors around) are not counted;
- every Triton kernel launch (`JITFunction.run` / the interpreter's `run`);
- host syncs (`.item()`, `_local_scalar_dense`) are reported beside, not counted as launches.

Per layer is counted directly: the ops issued while the forward iterates over layer l of
`model.layers` are layer l's (the embedding gather and the final norm are "outside"). The figure
reported is the mean over the layers; `--layers N` runs only the first N (same per-layer counts,
faster: the test runs one). A warm-up step runs first, so the
counted step is the steady state (cached tile configs, cached rank bounds), as a CUDA graph
would replay it.

Two setups: base only (no adapter), and two resident adapters (expert LoRA on gate, up and
down, per-expert ranks 1..8) with the batch's 8 tokens spread over base, adapter 0 and adapter 1.
`--dense` adds attention LoRA (q, v, o) to both adapters (a third count, not in the JSON's two
headline keys). `--out FILE` writes {"per_layer_base": x, "per_layer_lora": y, ...}. `--host`
also times fused_moe's input checks with LoRA (full vs the per-shape cached path).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, uninstalled

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

BATCH = 8
# aten ops that launch no kernel on a GPU: allocations and metadata (views are found by schema)
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
             "detach", "alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
             "is_same_size", "_local_scalar_dense", "set_", "resize_", "record_stream"}
SYNCS = {"_local_scalar_dense"}


def _copied(args, out) -> bool:
    """An op whose schema may alias its input (`to`, `reshape`, `contiguous`) launched a copy
    when its output does not share the input's storage."""
    src = next((a for a in args if isinstance(a, torch.Tensor)), None)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return src is not None and any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr()
                                   != src.untyped_storage().data_ptr() for o in outs)


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel and Triton launches, per region (layer index or 'outside')."""

    def __init__(self):
        super().__init__()
        self.region: int | str = "outside"
        self.ops: collections.Counter = collections.Counter()  # (region, name) -> launches
        self.syncs: collections.Counter = collections.Counter()  # (region, name) -> host syncs
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_triton:
            name = func.overloadpacket.__name__
            if name in SYNCS:
                self.syncs[(self.region, name)] += 1
            elif name not in NO_LAUNCH and (not func.is_view or _copied(args, out)):
                self.ops[(self.region, "aten." + name)] += 1
        return out

    def triton_launch(self, name: str) -> None:
        self.ops[(self.region, "triton." + name)] += 1

    def per_region(self, region) -> dict[str, int]:
        return dict(sorted((n, c) for (r, n), c in self.ops.items() if r == region))


class _TrackedLayers(list):
    """model.layers stand-in: iterating it tells the counter which layer is running."""

    def __init__(self, layers, counter: LaunchCounter):
        super().__init__(layers)
        self.counter = counter
        self.seen: set[int] = set()

    def __iter__(self):
        for i in range(len(self)):
            self.counter.region = i
            self.seen.add(i)
            yield list.__getitem__(self, i)
        self.counter.region = "outside"


def _patch_triton(counter_ref: list):
    """Wrap the run() of compiled and interpreted Triton kernels to count launches."""
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - triton without an interpreter
        pass
    saved = []
    for cls in classes:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            c = counter_ref[0]
            if c is None or kwargs.get("warmup"):
                return _orig(self, *args, **kwargs)
            c.triton_launch(getattr(self, "__name__", None) or self.fn.__name__)
            c.in_triton += 1
            try:
                return _orig(self, *args, **kwargs)
            finally:
                c.in_triton -= 1

        cls.run = run
        saved.append((cls, orig))
    return saved


def _adapter(shape, seed: int, dense: bool, dtype):
    from drlora.adapter_format import Adapter, AdapterConfig

    g = torch.Generator().manual_seed(seed)
    L, E = shape.num_hidden_layers, shape.num_experts
    ranks = {p: torch.randint(1, 9, (L, E), generator=g).tolist() for p in ("gate", "up", "down")}
    dense_ranks = {p: torch.randint(1, 5, (L,), generator=g).tolist() for p in ("q_proj", "v_proj", "o_proj")} if dense else {}
    cfg = AdapterConfig(base_model="tiny", base_shape=shape, method="dr-lora", scaling=2.0, ranks=ranks,
                        dense_ranks=dense_ranks)
    t = {}
    for p, per_layer in list(ranks.items()) + [(p, [[r] for r in rs]) for p, rs in dense_ranks.items()]:
        i, o = shape.proj_dims(p)
        where = "experts" if p in ranks else "self_attn"
        for l, r in enumerate(per_layer):
            t[f"layers.{l}.{where}.{p}.lora_A"] = (torch.randn(sum(r), i, generator=g) * 0.05).to(dtype)
            t[f"layers.{l}.{where}.{p}.lora_B"] = (torch.randn(o, sum(r), generator=g) * 0.05).to(dtype)
    return Adapter(cfg, t)


def build(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The tiny model with a random paged KV cache, a pool holding two adapters, and a decode batch."""
    from drlora.models import MoeShape, resolve_model
    from drlora_serve.kv_cache import KVCache
    from drlora_serve.models.registry import get_model_class

    model_dir = resolve_model("tiny")
    config = json.loads((model_dir / "config.json").read_text())
    model = get_model_class(config.get("model_type", "olmoe")).from_pretrained(model_dir, config, dtype, device)
    shape = MoeShape.from_config(config)
    g = torch.Generator().manual_seed(seed)
    bs, maxb = 16, 2  # contexts up to 31 tokens over two blocks (short: the interpreter is slow)
    kv = KVCache(shape.num_hidden_layers, BATCH * maxb, bs, shape.num_key_value_heads, shape.head_dim, dtype, device)
    for k, v in kv.layers:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    model.kv_caches = kv.layers
    lens = torch.randint(1, bs * maxb, (BATCH,), generator=g)
    tables = torch.randperm(BATCH * maxb, generator=g).view(BATCH, maxb)
    pos = lens - 1
    batch = dict(ids=torch.randint(0, config["vocab_size"], (BATCH,), generator=g).to(device),
                 positions=pos.to(device), slot_mapping=(tables[torch.arange(BATCH), pos // bs] * bs + pos % bs).to(device),
                 block_tables=tables.to(torch.int32).to(device), context_lens=lens.to(torch.int32).to(device))
    return model, shape, batch


def lora_pool(shape, dense: bool, dtype, device):
    from drlora_serve.lora_buffers import LoraBuffers

    pool = LoraBuffers(shape, 4, 4 * shape.num_experts * 8, 64, dtype, device)
    for slot in (0, 1):
        assert pool.load(slot, _adapter(shape, 100 + slot, dense, dtype))
    return pool


def count_step(model, batch, lora, slot_ids) -> LaunchCounter:
    """One warm-up decode step, then one counted."""
    from drlora_serve.context import ForwardContext

    ctx = ForwardContext(positions=batch["positions"], slot_mapping=batch["slot_mapping"], slot_ids=slot_ids,
                         num_decode=BATCH, block_tables=batch["block_tables"], context_lens=batch["context_lens"],
                         lora=lora)
    with torch.inference_mode():
        model.forward(batch["ids"], ctx)
    counter = LaunchCounter()
    ref = [counter]
    saved = _patch_triton(ref)
    layers = model.layers
    tracked = model.layers = _TrackedLayers(layers, counter)
    try:
        with torch.inference_mode(), counter:
            model.forward(batch["ids"], ctx)
    finally:
        model.layers = layers
        ref[0] = None
        for cls, orig in saved:
            cls.run = orig
    if tracked.seen != set(range(len(layers))):
        raise RuntimeError("the forward did not iterate model.layers: cannot attribute ops to layers")
    return counter


def summarize(counter: LaunchCounter, num_layers: int) -> dict:
    per = [sum(counter.per_region(l).values()) for l in range(num_layers)]
    tri = [sum(c for n, c in counter.per_region(l).items() if n.startswith("triton.")) for l in range(num_layers)]
    return {"per_layer": sum(per) / num_layers, "triton_per_layer": sum(tri) / num_layers,
            "min_layer": min(per), "max_layer": max(per),
            "outside_layers": sum(counter.per_region("outside").values()),
            "host_syncs": sum(counter.syncs.values()), "layer0_ops": counter.per_region(0)}


def run(device: str = "cpu", dtype: str = "bfloat16", dense: bool = False, layers: int | None = None) -> dict:
    """Count both setups (base, two adapters) and, with dense, a third with attention LoRA.
    layers: run only the first N layers (the per-layer counts do not change; faster)."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels/_tl is first imported
    os.environ["DRLORA_FORCE_TRITON"] = "1"
    dev, dt = torch.device(device), getattr(torch, dtype)
    model, shape, batch = build(dev, dt)
    if layers is not None:
        model.layers = model.layers[:layers]
    L = len(model.layers)
    res = {"model": "tiny", "layers": L, "batch": BATCH, "device": device, "dtype": dtype}
    res["base"] = summarize(count_step(model, batch, None, torch.full((BATCH,), -1, dtype=torch.int32, device=dev)), L)
    slots = torch.tensor([-1, 0, 1, 0, -1, 1, 0, 1], dtype=torch.int32, device=dev)
    res["lora"] = summarize(count_step(model, batch, lora_pool(shape, False, dt, dev), slots), L)
    if dense:
        res["lora_dense"] = summarize(count_step(model, batch, lora_pool(shape, True, dt, dev), slots), L)
    res["per_layer_base"] = res["base"]["per_layer"]
    res["per_layer_lora"] = res["lora"]["per_layer"]
    return res


def host_check_us(reps: int = 2000) -> dict:
    """Host time per call of fused_moe's input checks with LoRA at OLMoE-1B-7B shapes (meta tensors:
    the checks read metadata only): the full check vs the per-shape cached path."""
    import time

    from kernels._dispatch import checked_once
    from kernels.fused_moe import _moe_key, check_moe_inputs
    from kernels.lora_types import MoeLoraLayer

    t_, k_, e_, h_, i_, s_, r_ = 64, 8, 64, 2048, 1024, 16, 16 * 64 * 16
    m = dict(device="meta", dtype=torch.bfloat16)
    args = (torch.empty(t_, h_, **m), torch.empty(e_, 2 * i_, h_, **m), torch.empty(e_, h_, i_, **m),
            torch.empty(t_, k_, device="meta"), torch.empty(t_, k_, device="meta", dtype=torch.int32))
    lora = MoeLoraLayer(scales=torch.empty(s_, device="meta"))
    for p, (din, dout) in {"gate": (h_, i_), "up": (h_, i_), "down": (i_, h_)}.items():
        lora.a[p], lora.b[p] = torch.empty(r_, din, **m), torch.empty(r_, dout, **m)
        lora.offsets[p] = torch.empty(s_, e_, device="meta", dtype=torch.int32)
        lora.ranks[p] = torch.empty(s_, e_, device="meta", dtype=torch.int32)
    slots = torch.empty(t_, device="meta", dtype=torch.int32)
    out = {}
    for name, fn in (("full_check_us", lambda: check_moe_inputs(*args, lora, slots)),
                     ("cached_check_us", lambda: checked_once(_moe_key(*args, lora, slots),
                                                              lambda: check_moe_inputs(*args, lora, slots)))):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / reps * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the counts as JSON")
    ap.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16, the GPU default: its casts count)")
    ap.add_argument("--dense", action="store_true", help="also count adapters with attention LoRA (q, v, o)")
    ap.add_argument("--verbose", action="store_true", help="print layer 0's ops")
    ap.add_argument("--layers", type=int, help="run only the first N layers (same per-layer counts, faster)")
    ap.add_argument("--host", action="store_true", help="also time fused_moe's input checks with LoRA, full vs cached")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.host:
        hc = host_check_us()
        print(f"fused_moe input checks with LoRA (OLMoE shapes), host time per call: full {hc['full_check_us']:.1f} us, "
              f"cached per shape {hc['cached_check_us']:.1f} us")
    res = run(a.device, a.dtype, a.dense, a.layers)
    if a.host:
        res["host_checks"] = hc
    print(f"launches per layer, one decode step, tiny model ({res['layers']} layers run), batch {BATCH}, {a.dtype}, "
          f"Triton path on {a.device}{' (interpreter)' if a.device == 'cpu' else ''}:")
    for key in ("base", "lora", "lora_dense"):
        if key in res:
            r = res[key]
            print(f"  {key:10s} {r['per_layer']:5.1f} per layer ({r['triton_per_layer']:.1f} Triton, "
                  f"layers {r['min_layer']}..{r['max_layer']}); outside the layers {r['outside_layers']}; "
                  f"host syncs {r['host_syncs']}")
            if a.verbose:
                for n, c in r["layer0_ops"].items():
                    print(f"      {c:3d}  {n}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
