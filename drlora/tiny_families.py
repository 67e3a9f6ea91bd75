"""Tiny random checkpoints of the Qwen3-MoE, Qwen2-MoE and Mixtral families (tests, examples).

Each is built from transformers' own config and model classes with small dims and random
weights (seeded), saved in Hugging Face format with the bundled tiny tokenizer
(`drlora/assets/tiny`), in one of two expert layouts:

- `hub`: what `save_pretrained` writes, the hub's per-expert keys (`mlp.experts.{e}.gate_proj`,
  Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`), which transformers fuses on load;
- `fused`: transformers v5's in-memory layout written as is (`mlp.experts.gate_up_proj`
  (E, 2I, H), `mlp.experts.down_proj` (E, H, I)), which it loads without conversion.

RMSNorm weights and attention biases get random values too (transformers initialises them
to ones and zeros), so that a norm or a bias applied in the wrong place shows in the logits.
Each tiny model exercises its family's features: Qwen3-MoE per-head q/k norm with
head_dim != hidden/heads, GQA, renormalised top-k and one dense-MLP layer (`mlp_only_layers`);
Qwen2-MoE q/k/v biases and a shared expert; Mixtral 8 experts top-2 and GQA.

    python -m drlora.tiny_families qwen3_moe OUT [--layout fused]   # build one
    --model tiny-qwen3-moe | tiny-qwen2-moe | tiny-mixtral              # built once into the cache

# E experts, H hidden, I intermediate
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drlora.models import TINY_FAMILIES as NAMES  # --model name -> model_type
from drlora.tiny import ASSET_DIR, cache_root

LAYOUTS = ("hub", "fused")


@dataclass(frozen=True)
class TinyFamilySpec:
    model_type: str
    layout: str = "hub"
    seed: int = 0
    hidden_size: int = 64
    num_hidden_layers: int = 3
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_size: int = 32  # an expert's intermediate size
    init_std: float = 0.08  # larger than transformers' 0.02, so logits and adapters matter
    tie_word_embeddings: bool = False
    version: int = 1

    @property
    def name(self) -> str:
        tied = "-tied" if self.tie_word_embeddings else ""
        return f"tiny-{self.model_type}-{self.layout}{tied}-v{self.version}-s{self.seed}"


def hf_config(spec: TinyFamilySpec, vocab: int, bos: int, eos: int, pad: int):
    """transformers' config object of the tiny model."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
                  num_experts_per_tok=spec.num_experts_per_tok, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  tie_word_embeddings=spec.tie_word_embeddings,
                  initializer_range=spec.init_std, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    t = spec.model_type
    if t == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=spec.num_experts,
            moe_intermediate_size=spec.expert_size, intermediate_size=96, norm_topk_prob=True,
            mlp_only_layers=[1], attention_bias=False)
    if t == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, num_experts=spec.num_experts,
            moe_intermediate_size=spec.expert_size, intermediate_size=96, shared_expert_intermediate_size=48,
            norm_topk_prob=False, qkv_bias=True)
    if t == "mixtral":
        return transformers.MixtralConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, num_local_experts=spec.num_experts,
            intermediate_size=spec.expert_size, sliding_window=None)
    raise ValueError(f"no tiny builder for model_type '{t}' (have qwen3_moe, qwen2_moe, mixtral)")


def copy_tokenizer(out_dir: Path) -> None:
    for f in ASSET_DIR.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out_dir / f.name)


def build_tiny_family(spec: TinyFamilySpec, out_dir: str | Path) -> Path:
    """Build the checkpoint into out_dir (random weights from spec.seed)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if spec.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{spec.layout}'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(out_dir)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    config = hf_config(spec, tok.get_vocab_size(), eos, eos, pad)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight"):
                prm.copy_(1.0 + 0.2 * torch.randn(prm.shape, generator=g))
            elif name.endswith(".bias"):
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
    model.save_pretrained(out_dir)  # config.json, generation_config.json, hub-layout weights
    if spec.layout == "fused":
        for f in out_dir.glob("model*.safetensors*"):
            f.unlink()
        sd = model.state_dict()
        if spec.tie_word_embeddings:  # one tensor for both, as transformers saves it
            sd.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
    (out_dir / "drlora_tiny.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def ensure_tiny_family(model_type: str, layout: str = "hub", seed: int = 0, tied: bool = False) -> Path:
    """Path of a tiny checkpoint of one family, built once into the drlora cache."""
    spec = TinyFamilySpec(model_type, layout, seed, tie_word_embeddings=tied)
    target = cache_root() / "models" / spec.name
    if (target / "drlora_tiny.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent builders never see a half-written one
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        build_tiny_family(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drlora.tiny_families", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_type", choices=sorted(set(NAMES.values())))
    ap.add_argument("out")
    ap.add_argument("--layout", default="hub", choices=LAYOUTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_tiny_family(TinyFamilySpec(args.model_type, args.layout, args.seed), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
