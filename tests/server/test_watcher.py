"""The adapter folder watcher, driven poll by poll (no sleeping) over the FakeEngine."""

from __future__ import annotations

import asyncio
import os
import shutil

from server.watcher import AdapterWatcher
from tests.server.conftest import make_adapter
from tests.server.fake_engine import FakeEngine


def test_watcher_load_reload_unload(tokenizer, tmp_path):
    engine = FakeEngine(tokenizer)
    w = AdapterWatcher(engine, str(tmp_path), interval=0.05)

    async def scenario():
        make_adapter(tmp_path / "early", seed=1)
        await w.poll(initial=True)  # present at start: loaded at once
        assert set(engine.adapters) == {"early"}

        # weights written, config not yet: not complete, nothing happens
        make_adapter(tmp_path / "stage", seed=2)
        (tmp_path / "new").mkdir()
        shutil.copy(tmp_path / "stage" / "drlora_adapter.safetensors", tmp_path / "new")
        await w.poll()
        await w.poll()
        assert "new" not in engine.adapters
        shutil.copy(tmp_path / "stage" / "drlora_adapter.json", tmp_path / "new")
        await w.poll()  # complete, but seen once: wait for a second identical poll
        assert "new" not in engine.adapters
        await w.poll()
        assert "new" in engine.adapters and engine.adapters["new"].version == 0

        # replaced files: reloaded in place once stable
        make_adapter(tmp_path / "new", seed=3)
        os.utime(tmp_path / "new" / "drlora_adapter.json", ns=(1, 1))  # make sure mtime differs
        await w.poll()
        await w.poll()
        assert engine.adapters["new"].version == 1

        # a broken adapter is logged, not fatal, and not retried until it changes
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "drlora_adapter.json").write_text("{")
        (tmp_path / "broken" / "drlora_adapter.safetensors").write_bytes(b"x")
        await w.poll()
        await w.poll()
        await w.poll()
        assert "broken" not in engine.adapters and "broken" in w.failed

        # removed folder: unloaded; the stage folder was loaded meanwhile
        shutil.rmtree(tmp_path / "new")
        await w.poll()
        assert "new" not in engine.adapters and "early" in engine.adapters

        # unloaded through the API: the watcher does not fight it
        await engine.unload_adapter("early")
        await w.poll()
        await w.poll()
        assert "early" not in engine.adapters

        # the background task runs and stops cleanly
        await w.start()
        make_adapter(tmp_path / "late", seed=4)
        for _ in range(100):
            if "late" in engine.adapters:
                break
            await asyncio.sleep(0.02)
        await w.stop()
        assert "late" in engine.adapters

    asyncio.run(scenario())


def test_watcher_is_confined_like_the_load_endpoint(tokenizer, tmp_path, caplog):
    """A symlinked adapter folder pointing outside the watched folder, or adapter files
    symlinked outside, are refused (logged, not loaded), as the load endpoint refuses them;
    a symlink that stays inside is fine (issue 10.6)."""
    import pytest

    from server.adapters import resolve_lora_path
    from server.errors import APIError

    root, outside = tmp_path / "adapters", tmp_path / "outside"
    root.mkdir()
    make_adapter(outside / "evil", seed=1)
    os.symlink(outside / "evil", root / "linked")  # the folder itself escapes
    (root / "half").mkdir()  # a real folder whose weights file escapes
    os.symlink(outside / "evil" / "drlora_adapter.safetensors", root / "half" / "drlora_adapter.safetensors")
    shutil.copy(outside / "evil" / "drlora_adapter.json", root / "half")
    (root / "cfg").mkdir()  # ... or whose config escapes
    os.symlink(outside / "evil" / "drlora_adapter.json", root / "cfg" / "drlora_adapter.json")
    shutil.copy(outside / "evil" / "drlora_adapter.safetensors", root / "cfg")
    make_adapter(root / ".staging" / "ok", seed=2)
    os.symlink(root / ".staging" / "ok", root / "alias")  # stays inside: allowed
    make_adapter(root / os.fsdecode(b"bad\xff"), seed=3)  # a name JSON cannot carry
    engine = FakeEngine(tokenizer)
    w = AdapterWatcher(engine, str(root), interval=0.05)

    async def scenario():
        await w.poll(initial=True)
        await w.poll()
        await w.poll()

    with caplog.at_level("WARNING", logger="drlora.server.watcher"):
        asyncio.run(scenario())
    assert set(engine.adapters) == {"alias"}
    assert {"linked", "half", "cfg", os.fsdecode(b"bad\xff")} <= set(w.failed)
    assert sum("not loading adapter folder" in r.message for r in caplog.records) == 4  # once each
    for name in ("linked", "half", "cfg"):  # the endpoint's verdict is the same
        with pytest.raises(APIError) as e:
            resolve_lora_path(str(root / name), [str(root)])
        assert e.value.status == 400
    assert resolve_lora_path(str(root / "alias"), [str(root)]) == str(root / ".staging" / "ok")


def test_watcher_skips_the_base_name_and_leaves_api_replacements(tokenizer, tmp_path, caplog):
    """A folder named like the base model is not loaded (requests naming it get the base, so
    the adapter could never be used; the load endpoint refuses that name too). A removed folder
    unloads only the adapter the watcher loaded from it, not one replaced through the API from
    another folder since."""
    import logging

    engine = FakeEngine(tokenizer)
    w = AdapterWatcher(engine, str(tmp_path / "watched"), interval=0.05, reserved=lambda n: n in ("tiny", "base"))

    async def scenario():
        make_adapter(tmp_path / "watched" / "tiny", seed=1)
        make_adapter(tmp_path / "watched" / "x", seed=2)
        make_adapter(tmp_path / "elsewhere" / "x", seed=3)
        with caplog.at_level(logging.WARNING, logger="drlora.server.watcher"):
            await w.poll(initial=True)
        assert set(engine.adapters) == {"x"} and "base model" in caplog.text
        await engine.load_adapter("x", str(tmp_path / "elsewhere" / "x"), replace=True)  # through the API
        shutil.rmtree(tmp_path / "watched" / "x")
        await w.poll()
        assert engine.adapters["x"].path == str(tmp_path / "elsewhere" / "x")
        # the ordinary case still unloads
        make_adapter(tmp_path / "watched" / "y", seed=4)
        await w.poll()
        await w.poll()
        assert "y" in engine.adapters
        shutil.rmtree(tmp_path / "watched" / "y")
        await w.poll()
        assert "y" not in engine.adapters

    asyncio.run(scenario())
