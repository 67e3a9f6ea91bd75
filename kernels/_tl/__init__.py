"""Triton kernels (imported lazily, only on Triton dispatch)."""

from __future__ import annotations

import os


def _fix_interpreter_index() -> None:
    """Let Triton 3.6's interpreter use runtime scalars as loop bounds (`range(0, n, BLOCK)`,
    `range(tl.cdiv(ctx, BS))`).

    Its `tensor.__index__` is `int(handle.data)` on a shape-(1,) array, which NumPy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"; deprecated since 1.25), so
    every kernel with a data-dependent loop bound fails in interpreter mode. Compiled code never
    goes through this, so the kernels keep their bounds (a max-bound loop with masking would cost
    real iterations on the GPU) and the interpreter gets an `__index__` that takes the one element.
    Interpreters whose own `__index__` works (3.9 squeezes) are left as they are.
    """
    import types

    import numpy as np

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "drlora_wrapped", False):
        return
    probe = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.ones(1, np.int32)))

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)  # installs __index__ among others, undone by scope.restore()
        try:
            tensor.__index__(probe)
        except TypeError:
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.drlora_wrapped = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_interpreter_index()
