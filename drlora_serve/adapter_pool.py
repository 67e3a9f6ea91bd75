"""Adapter lifecycle: registry of names and versions, host-memory LRU tier, device slots.

- Registering reads and fully validates the adapter (drlora format, or a PEFT folder converted
  by drlora.peft); a bad adapter raises and changes nothing.
- Replacing registers a new version; requests already submitted keep the version they pinned,
  which stays (host and device) until its last request finishes.
- Device residency: `max_loras` slots in LoraBuffers. A version with running sequences is
  pinned; others are evicted least recently used when a slot or rank rows are needed.
- Host tier: at most `max_cpu_loras` adapters keep their tensors in memory (LRU, versions with
  requests never dropped); the others are re-read from their folder when needed.
- Every disk read and every placement into the device pool is timed (`load_seconds`, by
  stage), and `info()` says which tier an adapter is in: the server's residency metrics.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from drlora.adapter_format import (
    Adapter,
    AdapterFormatError,
    NotAnAdapterError,
    expected_shapes,
    is_adapter_dir,
    read_adapter,
)
from drlora.models import MoeShape
from drlora.peft import ADAPTER_FILES, PEFT_CONFIG, peft_to_drlora

from drlora_serve.lora_buffers import LoraBuffers
from drlora_serve.types import AdapterInfo, AdapterNotFoundError, Histogram, LOAD_STAGES

_ids = itertools.count(1)  # AdapterVersion.uid: unique in the process, never reused
log = logging.getLogger(__name__)


@dataclass(eq=False)
class AdapterVersion:
    name: str
    version: int
    path: str
    total_rank: int
    adapter: Adapter | None  # host copy (None: dropped from the host tier)
    refs: int = 0  # unfinished requests pinned to this version
    active: int = 0  # running sequences (pins the device slot)
    slot: int | None = None
    last_used: float = 0.0
    max_rank: int = 0  # largest rank of any expert (or attention) projection
    uid: int = 0  # process-unique identity (prefix-cache key, host tier key); never repeats
    stamp: tuple = ()  # the folder's files (name, size, mtime) when read: a re-read must find the same


def valid_adapter_name(name: str) -> bool:
    """A name requests can use and metrics can label: not blank, no '/', no control characters."""
    return bool(name.strip()) and "/" not in name and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name)


def folder_stamp(path: str | Path) -> tuple:
    """(name, size, mtime_ns) of each adapter file of a folder (ADAPTER_FILES): changes when one
    is rewritten, added or removed; other files (a README edited, a training log appended
    beside it) do not count."""
    stamp = []
    for name in ADAPTER_FILES:
        try:
            st = (Path(path) / name).stat()
        except OSError:
            continue
        stamp.append((name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def read_any_adapter(path: str | Path, base: MoeShape) -> Adapter:
    path = Path(path)
    if is_adapter_dir(path):
        return read_adapter(path, base)
    if (path / PEFT_CONFIG).is_file():
        try:
            cfg, tensors = peft_to_drlora(path, base)
        except AdapterFormatError:
            raise
        except Exception as exc:
            raise AdapterFormatError(f"PEFT adapter {path} could not be converted ({exc})") from None
        want = expected_shapes(cfg)
        for k, shape in want.items():
            if k not in tensors or tuple(tensors[k].shape) != shape:
                raise AdapterFormatError(f"converted PEFT adapter: tensor {k} missing or not {shape}")
        return Adapter(cfg, tensors, path)
    if not path.is_dir():
        raise NotAnAdapterError(f"{path} is not a folder")
    raise NotAnAdapterError(f"{path} holds no adapter (neither drlora_adapter.json nor adapter_config.json)")


class AdapterPool:
    def __init__(self, base: MoeShape, buffers: LoraBuffers, max_cpu_loras: int = 64, max_lora_rank: int = 256,
                 base_fingerprint: str | None = None):
        self.base, self.buffers = base, buffers
        self.base_fingerprint = base_fingerprint  # drlora.models.weights_fingerprint of the served base
        self.max_cpu_loras, self.max_lora_rank = max_cpu_loras, max_lora_rank
        self.current: dict[str, AdapterVersion] = {}
        self.versions: list[AdapterVersion] = []  # every live version (current or still referenced)
        self.slots: list[AdapterVersion | None] = [None] * buffers.num_slots
        self.host: OrderedDict[int, AdapterVersion] = OrderedDict()  # uid -> version with tensors
        self.num_loads = self.num_evictions = self.num_compactions = 0
        self.load_seconds = {stage: Histogram() for stage in LOAD_STAGES}  # see types.LOAD_STAGES

    # ------------------------------------------------------------------ registry
    def register(self, name: str, path: str | Path, replace: bool = False) -> AdapterInfo:
        if not valid_adapter_name(name):
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self.current and not replace:
            raise ValueError(f"adapter '{name}' is already loaded (use replace to swap it)")
        stamp = folder_stamp(path)
        info = self.add(name, self._read(path), str(Path(path).resolve()), replace)
        self.current[name].stamp = stamp
        return info

    def _read(self, path: str | Path) -> Adapter:
        t0 = time.perf_counter()
        adapter = read_any_adapter(path, self.base)
        self.load_seconds["disk_to_cpu"].observe(time.perf_counter() - t0)
        return adapter

    def add(self, name: str, adapter: Adapter, path: str = "", replace: bool = False) -> AdapterInfo:
        """Register an adapter already in memory (tensors on any device)."""
        if name in self.current and not replace:
            raise ValueError(f"adapter '{name}' is already loaded (use replace to swap it)")
        cfg = adapter.config
        top = max([max(map(max, r)) for r in cfg.ranks.values()] + [max(r) for r in cfg.dense_ranks.values()] + [0])
        if top > self.max_lora_rank:
            raise AdapterFormatError(f"adapter '{name}' has rank {top} > max_lora_rank={self.max_lora_rank}")
        err = self.buffers.capacity_error(adapter)
        if err:
            raise AdapterFormatError(f"adapter '{name}' {err}")
        trained_on = cfg.provenance.get("base_fingerprint")
        if trained_on and self.base_fingerprint and trained_on != self.base_fingerprint:
            # same shape, other weights (a retrained base, a base vs instruct model): served, as vLLM
            # and PEFT do, but said loudly, since outputs will not be what training measured
            log.warning("adapter '%s' was trained on base weights %s, but the served base is %s",
                        name, trained_on, self.base_fingerprint)
        old = self.current.get(name)
        v = AdapterVersion(name, (old.version + 1) if old else 1, path, cfg.total_ranks(),
                           adapter, uid=next(_ids), last_used=time.monotonic(), max_rank=top)
        self.current[name] = v
        self.versions.append(v)
        self._host_touch(v)
        if old is not None:
            self._maybe_drop(old)
        return self.info(v)

    def unregister(self, name: str) -> None:
        v = self.current.pop(name, None)
        if v is None:
            raise AdapterNotFoundError(f"adapter '{name}' is not loaded")
        self._maybe_drop(v)  # requests still on it finish first

    def get(self, name: str) -> AdapterVersion:
        v = self.current.get(name)
        if v is None:
            raise AdapterNotFoundError(f"adapter '{name}' not found (loaded: {', '.join(sorted(self.current)) or 'none'})")
        return v

    def info(self, v: AdapterVersion) -> AdapterInfo:
        tier = "gpu" if v.slot is not None else "cpu" if v.adapter is not None else "disk"
        return AdapterInfo(v.name, v.path, v.version, v.total_rank, v.slot is not None, v.active > 0,
                           tier=tier, max_rank=v.max_rank)

    def list(self) -> list[AdapterInfo]:
        return [self.info(v) for _, v in sorted(self.current.items())]

    # ------------------------------------------------------------------ request pins
    def acquire(self, name: str) -> AdapterVersion:
        v = self.get(name)
        v.refs += 1
        return v

    def release(self, v: AdapterVersion) -> None:
        v.refs -= 1
        assert v.refs >= 0
        self._maybe_drop(v)

    def _maybe_drop(self, v: AdapterVersion) -> None:
        if v.refs == 0 and self.current.get(v.name) is not v and v in self.versions:
            self.versions.remove(v)
            if v.slot is not None:
                self._evict(v)
            self.host.pop(v.uid, None)
            v.adapter = None

    # ------------------------------------------------------------------ device residency
    def activate(self, v: AdapterVersion) -> int | None:
        """Make v resident and pin it for one more running sequence; None if it cannot be
        placed now (every slot or the rank rows are held by pinned adapters)."""
        if v.slot is None and not self._place(v):
            return None
        v.active += 1
        v.last_used = time.monotonic()
        return v.slot

    def deactivate(self, v: AdapterVersion) -> None:
        v.active -= 1
        assert v.active >= 0

    def _place(self, v: AdapterVersion) -> bool:
        adapter = self._host_get(v)
        while True:
            free = [s for s, o in enumerate(self.slots) if o is None]
            if free and self.buffers.fits(adapter):
                break
            victims = [o for o in self.slots if o is not None and o.active == 0]
            if not victims:
                return False
            self._evict(min(victims, key=lambda o: o.last_used))
        slot = free[0]
        t0 = time.perf_counter()
        ok = self.buffers.load(slot, adapter)
        self.buffers.synchronize()  # device copies may be asynchronous: time them whole
        self.load_seconds["cpu_to_gpu"].observe(time.perf_counter() - t0)
        assert ok
        self.slots[slot], v.slot = v, slot
        self.num_loads += 1
        return True

    def _evict(self, v: AdapterVersion) -> None:
        self.buffers.unload(v.slot)
        self.slots[v.slot], v.slot = None, None
        self.num_evictions += 1

    def compact(self) -> int:
        """Defragment every (layer, projection) pool; returns rows moved."""
        moved = self.buffers.compact()
        self.num_compactions += 1
        return moved

    # ------------------------------------------------------------------ host tier
    def _host_touch(self, v: AdapterVersion) -> None:
        self.host[v.uid] = v
        self.host.move_to_end(v.uid)
        while len(self.host) > self.max_cpu_loras:
            drop = next((o for o in self.host.values() if o.refs == 0 and o is not v), None)
            if drop is None:
                break
            self.host.pop(drop.uid)
            if drop.path:  # adapters added from memory have no folder to re-read: keep them
                drop.adapter = None

    def _host_get(self, v: AdapterVersion) -> Adapter:
        """v's tensors, read again from its folder if the host tier dropped them. The folder must
        still hold what was registered (the files' names, sizes and times): a version never
        changes weights (its uid keys the prefix cache) and was checked against the pool's
        limits when registered; AdapterFormatError otherwise."""
        if v.adapter is None:
            if folder_stamp(v.path) != v.stamp:
                raise AdapterFormatError(
                    f"adapter '{v.name}' (version {v.version}) changed on disk since it was loaded and is no longer "
                    f"in host memory; load it again (replace) to serve the new files")
            v.adapter = self._read(v.path)
        self._host_touch(v)
        return v.adapter
