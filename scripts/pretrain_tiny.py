"""Pretrain the `tiny` OLMoE checkpoint on the project's synthetic corpus (CPU, minutes).

Starts from `build_tiny(TinySpec(), ...)` (seeded random weights + the corpus-trained BPE
tokenizer), trains next-token prediction on packed corpus lines with AdamW and a cosine lr,
with a small load-balancing loss so that experts can specialise by text family, then measures
per-family perplexity and routing on held-out lines and writes the checkpoint (HF format,
float32) with `pretrain_log.json` and `routing_stats.json` beside it.

    python scripts/pretrain_tiny.py --probe            # a few steps: measure tokens/s
    python scripts/pretrain_tiny.py                    # full run -> drlora/assets/tiny

The run builds into a staging folder and renames it into place at the end, so that nobody
sees a half-trained checkpoint at the output path.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from drlora.corpus import FAMILIES, labelled_corpus
from drlora.tiny import ASSET_DIR, TinySpec, build_tiny


@dataclass
class PretrainConfig:
    seed: int = 0
    data_seed: int = 1  # the tokenizer is trained on corpus seed 0; train on other lines
    eval_seed: int = 2
    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Small, and the HF loss balances over the whole batch, not per family: a family may
    # still own a few experts, which is the specialisation the DR-LoRA demo relies on.
    router_aux_loss_coef: float = 0.005
    eval_lines_per_family: int = 400
    threads: int = 1
    log_every: int = 50
    eval_every: int = 500  # per-family held-out loss on a few lines, to watch skills form
    out: str = str(ASSET_DIR)


def packed_batches(cfg: PretrainConfig, tok, eos: int) -> torch.Tensor:
    """All training sequences (steps * batch, seq_len): corpus lines + eos, concatenated."""
    need = cfg.steps * cfg.batch_size * cfg.seq_len
    stream: list[int] = []
    lines = labelled_corpus(10**9, seed=cfg.data_seed)
    while len(stream) < need:
        chunk = [text for _, text in (next(lines) for _ in range(20_000))]
        for enc in tok(chunk, add_special_tokens=False)["input_ids"]:
            stream += enc + [eos]
    return torch.tensor(stream[:need]).view(cfg.steps * cfg.batch_size, cfg.seq_len)


def lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def family_stats(model, tok, cfg: PretrainConfig, n_lines: int | None = None) -> tuple[dict, dict]:
    """Per-family held-out perplexity and per-layer top-k routing counts."""
    n_lines = n_lines or cfg.eval_lines_per_family
    model.eval()
    by_fam: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for fam, text in labelled_corpus(n_lines * len(FAMILIES) * 3, seed=cfg.eval_seed):
        if len(by_fam[fam]) < n_lines:
            by_fam[fam].append(text)
    E, L = model.config.num_experts, model.config.num_hidden_layers
    ppl, counts = {}, {}
    for fam, texts in by_fam.items():
        nll, ntok = 0.0, 0
        cnt = torch.zeros(L, E, dtype=torch.long)
        for i in range(0, len(texts), 64):
            enc = [ids + [tok.eos_token_id] for ids in
                   tok(texts[i:i + 64], add_special_tokens=False)["input_ids"]]
            S = max(map(len, enc))
            ids = torch.full((len(enc), S), tok.pad_token_id)
            mask = torch.zeros((len(enc), S), dtype=torch.long)
            for j, e in enumerate(enc):
                ids[j, :len(e)], mask[j, :len(e)] = torch.tensor(e), 1
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(torch.nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
            ntok += int((labels != -100).sum())
            keep = mask.flatten().bool()
            for layer, logits in enumerate(out.router_logits):
                top = logits[keep].topk(model.config.num_experts_per_tok, dim=-1).indices
                cnt[layer] += torch.bincount(top.flatten(), minlength=E)
        ppl[fam] = {"loss": nll / ntok, "ppl": math.exp(nll / ntok), "tokens": ntok}
        counts[fam] = cnt
    return ppl, counts


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def routing_summary(counts: dict[str, torch.Tensor], top_n: int = 4) -> dict:
    """Per layer: each family's expert distribution (share of its top-k slots), its entropy
    (bits; uniform over 16 experts = 4), the top experts, and the mutual information between
    family and expert (uniform family prior; 0 = no specialisation)."""
    fams = list(counts)
    L, E = counts[fams[0]].shape
    layers = []
    for layer in range(L):
        dist = {f: counts[f][layer].double() / counts[f][layer].sum() for f in fams}
        mix = sum(dist.values()) / len(fams)
        per_fam = {}
        for f in fams:
            order = dist[f].argsort(descending=True)
            per_fam[f] = {
                "entropy_bits": round(entropy(dist[f]), 3),
                "top_experts": [[int(e), round(float(dist[f][e]), 3)] for e in order[:top_n]],
                f"top{top_n}_share": round(float(dist[f][order[:top_n]].sum()), 3),
                "distribution": [round(float(x), 4) for x in dist[f]],
            }
        h_mix = entropy(mix)
        mi = h_mix - sum(entropy(dist[f]) for f in fams) / len(fams)
        layers.append({
            "layer": layer,
            "mixture_entropy_bits": round(h_mix, 3),
            "mutual_information_bits": round(mi, 3),
            "mi_over_family_entropy": round(mi / math.log2(len(fams)), 3),
            "families": per_fam,
        })
    return {"uniform_entropy_bits": math.log2(E), "top_n_uniform_share": top_n / E, "layers": layers}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(PretrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--probe", action="store_true", help="run 10 steps, report tokens/s, write nothing")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if args.probe:
        cfg.steps = 10
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and not (args.force or args.probe):
        raise SystemExit(f"{out} exists; pass --force to replace it")

    from transformers import AutoTokenizer, OlmoeForCausalLM

    stage = out.parent / f".{out.name}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    build_tiny(TinySpec(seed=cfg.seed), stage)
    tok = AutoTokenizer.from_pretrained(stage)
    model = OlmoeForCausalLM.from_pretrained(stage, dtype=torch.float32)
    model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    n_params = sum(p.numel() for p in model.parameters())

    t0 = time.time()
    data = packed_batches(cfg, tok, tok.eos_token_id)
    print(f"data: {data.numel():,} tokens in {time.time() - t0:.1f}s; params {n_params:,}", flush=True)

    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    history, t_start = [], time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x = data[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        res = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.steps:
            el = time.time() - t_start
            aux = float(res.aux_loss.detach())
            rec = {"step": step + 1, "loss": round(float(res.loss) - cfg.router_aux_loss_coef * aux, 4),
                   "aux_loss": round(aux, 4), "lr": round(lr_at(cfg, step), 6),
                   "grad_norm": round(float(gnorm), 3), "elapsed_s": round(el, 1),
                   "tokens_per_s": round((step + 1) * x.numel() / el)}
            if (step + 1) % cfg.eval_every == 0:
                ppl, _ = family_stats(model, tok, cfg, n_lines=64)
                rec["held_out_loss"] = {f: round(v["loss"], 3) for f, v in ppl.items()}
                model.train()
            history.append(rec)
            print(json.dumps(rec), flush=True)
    train_s = time.time() - t_start
    if args.probe:
        shutil.rmtree(stage, ignore_errors=True)
        return

    ppl, counts = family_stats(model, tok, cfg)
    routing = routing_summary(counts)
    print("held-out per family:", json.dumps({f: round(v["ppl"], 3) for f, v in ppl.items()}))
    for lay in routing["layers"]:
        print(f"layer {lay['layer']}: MI(family;expert) = {lay['mutual_information_bits']} bits; "
              + ", ".join(f"{f} H={v['entropy_bits']} top={[e for e, _ in v['top_experts']]}"
                          for f, v in lay["families"].items()), flush=True)

    model.config.output_router_logits = False
    model.save_pretrained(stage)  # float32, the hub's per-expert layout
    log = {"config": asdict(cfg), "params": n_params, "train_seconds": round(train_s, 1),
           "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "torch": torch.__version__,
           "final_loss": history[-1]["loss"], "history": history, "held_out": ppl}
    (stage / "pretrain_log.json").write_text(json.dumps(log, indent=1))
    (stage / "routing_stats.json").write_text(json.dumps(routing, indent=1))
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
