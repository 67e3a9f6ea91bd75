"""Triton kernels (imported lazily, only on Triton dispatch)."""
