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
