"""The trainer's configuration (one dataclass; the CLI maps flags onto it 1:1)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """Inconsistent or unusable settings (reported as a one-line CLI error)."""


@dataclass
class TrainConfig:
    data: str
    output: str
    model: str = "tiny"
    method: str = "drlora"  # drlora | lora | static
    # ranks and growth (paper v5 defaults)
    r_init: int = 8
    r_target: int = 16
    r_max: int = 32
    t_grow: int = 200
    p_grow: float = 0.1
    gamma: float = 1.2
    beta: float = 0.9
    t_buffer: int = 200
    frequency: str = "weight"  # weight (paper) | count (public code)
    importance: str = "product"  # product (paper) | sum (public code)
    targets: tuple[str, ...] = ("up", "down")
    alpha: float | None = None  # None: 2 * r_max (scale 2)
    train_router: bool = False
    shared_rank: int = 0  # Qwen2-MoE: uniform LoRA of this rank on the shared expert's targets (0: none)
    # optimisation
    max_steps: int = 200
    batch_size: int = 8
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0
    # data and eval
    eval_fraction: float = 0.1
    eval_data: str | None = None
    eval_max_examples: int = 64
    eval_max_new_tokens: int = 32
    static_examples: int = 256  # examples the static baseline routes through the frozen base
    # runtime
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    checkpoint_every: int = 0
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    push: str | None = None
    api_key: str | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise ConfigError (one line) on inconsistent settings."""
        if self.method not in ("drlora", "lora", "static"):
            raise ConfigError(f"--method must be drlora, lora or static, got '{self.method}'")
        if not self.output.strip():
            raise ConfigError("--output must name a folder (got an empty path)")
        if self.method == "lora":  # uniform r_target from the start: r_init plays no part
            if not (1 <= self.r_target <= self.r_max):
                raise ConfigError(f"need 1 <= r-target <= r-max, got {self.r_target}/{self.r_max}")
        elif not (1 <= self.r_init <= self.r_target <= self.r_max):
            raise ConfigError(f"need 1 <= r-init <= r-target <= r-max, got {self.r_init}/{self.r_target}/{self.r_max}")
        for name in ("max_steps", "batch_size", "t_grow", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.t_buffer < 0 or self.checkpoint_every < 0 or self.shared_rank < 0:
            raise ConfigError("--t-buffer, --checkpoint-every and --shared-rank must be >= 0")
        if not (0 < self.p_grow <= 1):
            raise ConfigError(f"--p-grow must be in (0, 1], got {self.p_grow}")
        if not (0 <= self.beta < 1):
            raise ConfigError(f"--beta must be in [0, 1), got {self.beta}")
        if not (0 <= self.warmup_ratio < 1) or not (0 <= self.eval_fraction < 1):
            raise ConfigError("--warmup-ratio and --eval-fraction must be in [0, 1)")
        # NaN passes every comparison's negation, so finiteness is checked explicitly
        for name, lo, strict in (("lr", 0.0, True), ("gamma", 0.0, False), ("weight_decay", 0.0, False),
                                 ("max_grad_norm", 0.0, False), ("alpha", 0.0, True)):
            v = getattr(self, name)
            if name == "alpha" and v is None:
                continue
            if not math.isfinite(v) or (v <= lo if strict else v < lo):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} 0, got {v}")
        if not (-2**63 <= self.seed < 2**64):  # the range torch.manual_seed accepts
            raise ConfigError(f"--seed must fit in 64 bits, got {self.seed}")
        if self.eval_max_examples < 0 or self.eval_max_new_tokens < 0 or self.static_examples < 1:
            raise ConfigError("--eval-max-examples and --eval-max-new-tokens must be >= 0, --static-examples >= 1")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.push is not None:
            u = urlsplit(self.push)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ConfigError(f"--push must be an http(s) URL like http://host:8000, got '{self.push}'")
        bad = [t for t in self.targets if t not in ("gate", "up", "down")]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--targets must be a comma list of gate, up, down; got {','.join(self.targets)}")
        if self.frequency not in ("weight", "count") or self.importance not in ("product", "sum"):
            raise ConfigError("--frequency must be weight|count and --importance product|sum")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got '{self.dtype}'")
