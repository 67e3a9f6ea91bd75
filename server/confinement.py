"""Adapter path confinement: the one rule for every way an adapter reaches the engine by
path (POST /v1/load_lora_adapter, the --adapters folder watcher).

A path is allowed only if its real path (symlinks followed, relative paths against the working
folder) lies inside one of the allowed roots, and so do the real paths of the files the loader
reads from it (a file symlinked out of a root escapes as surely as a folder). Checked before
existence, so that a path outside the roots reveals nothing about what exists there.
"""

from __future__ import annotations

import os

from drlora.peft import ADAPTER_FILES  # what the loader reads


class OutsideRootsError(ValueError):
    """The path, or a file in it, resolves outside every allowed root."""


def _inside(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, r]) == r for r in roots)


def confine(path: str, roots: list[str]) -> str:
    """The real path of adapter folder `path` if it and its adapter files resolve inside one
    of `roots` (real paths themselves); OutsideRootsError (a message naming `path`) otherwise."""
    if "\x00" in path:
        raise OutsideRootsError("the path contains a NUL byte")
    if not roots:
        raise OutsideRootsError("no adapter root is allowed")
    real = os.path.realpath(os.path.expanduser(path))
    if not _inside(real, roots):
        raise OutsideRootsError(f"'{path}' is outside the allowed adapter roots")
    for name in ADAPTER_FILES:
        f = os.path.join(real, name)
        if os.path.lexists(f) and not _inside(os.path.realpath(f), roots):
            raise OutsideRootsError(f"'{path}': {name} points outside the allowed adapter roots")
    return real
