"""The `tiny` model: an OLMoE-architecture checkpoint the project builds itself.

It is deterministic from a seed, has its own byte-level BPE tokenizer trained with
`tokenizers` on the project's synthetic corpus, and is saved in Hugging Face format
(config.json, model.safetensors in the hub's per-expert layout, tokenizer.json) so that it is
loaded through exactly the path a real OLMoE checkpoint takes.

If the package ships a pretrained tiny checkpoint (`drlora/assets/tiny`), `--model tiny`
uses that instead of building random weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drlora.corpus import corpus

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
# A minimal chat template: role markers as special tokens, eos after each turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ASSET_DIR = Path(__file__).parent / "assets" / "tiny"


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_experts: int = 16
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    seed: int = 0
    version: int = 3  # 3: corpus with more variety, spaced letters, one token per digit

    @property
    def name(self) -> str:
        return f"tiny-v{self.version}-s{self.seed}"


def cache_root() -> Path:
    return Path(os.environ.get("DRLORA_HOME", Path.home() / ".cache" / "drlora"))


def train_tokenizer(spec: TinySpec, out_dir: Path) -> int:
    """Train the byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits one token each, so that numbers tokenize regularly (arithmetic is learnable).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(20_000, seed=spec.seed), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return tok.get_vocab_size()


def build_tiny(spec: TinySpec, out_dir: Path) -> Path:
    """Build the checkpoint into out_dir (random weights from spec.seed)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(spec, out_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    config = OlmoeConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    torch.manual_seed(spec.seed)
    model = OlmoeForCausalLM(config)
    model.save_pretrained(out_dir)
    (out_dir / "drlora_tiny.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def ensure_tiny(spec: TinySpec | None = None) -> Path:
    """Path of the tiny checkpoint: the shipped pretrained one, else built once into the cache."""
    if spec is None and (ASSET_DIR / "config.json").exists():
        return ASSET_DIR
    spec = spec or TinySpec()
    target = cache_root() / "models" / spec.name
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp folder beside the target, then rename: concurrent builders never see
    # a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        build_tiny(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
