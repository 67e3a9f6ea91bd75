"""drlora kernels: fused MoE, rank-exact multi-adapter LoRA, paged attention.

Every op has a Triton kernel (CUDA, or forced with DRLORA_FORCE_TRITON=1) and a plain-torch
twin with identical semantics (CPU). Importing this package does not import triton.
"""

from kernels.ops import *  # noqa: F401,F403
from kernels.ops import __all__  # noqa: F401
