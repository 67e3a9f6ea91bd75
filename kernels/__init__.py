"""drlora kernels: fused MoE, rank-exact multi-adapter LoRA, paged attention (Triton + torch twins)."""
