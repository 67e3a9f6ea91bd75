"""Tile tuning tables: benchmarks/tune.py end to end in the interpreter (--tiny) writes a table
that kernels/tiles.py then returns for that kernel, shape, dtype and device (the heuristic
otherwise); the nearest bucket wins; the launchers use a table's tiles and stay correct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import fused_moe, tiles
from kernels.fused_moe import fused_moe_torch
from kt_helpers import assert_close, make_moe, make_moe_lora

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An extra table folder (DRLORA_TILE_CONFIGS); memoised choices forgotten before and after."""
    d = tmp_path / "configs"
    d.mkdir()
    monkeypatch.setenv(tiles.CONFIG_ENV, str(d))
    tiles.reload_tables()
    yield d
    monkeypatch.delenv(tiles.CONFIG_ENV)
    tiles.reload_tables()


def write_table(d: Path, entries: list[dict], device: str = "cpu") -> None:
    (d / "t.json").write_text(json.dumps({"device": device, "entries": entries}))


def gemm_entry(E, N, K, buckets, dtype="float32"):
    return {"kernel": "moe_gemm", "E": E, "N": N, "K": K, "dtype": dtype, "buckets": buckets}


def test_tuner_tiny_writes_the_table_tiles_reads(table_dir):
    pytest.importorskip("triton")
    out = table_dir / "cpu_tiny.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune.py"), "--tiny", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu"
    kinds = {(e["kernel"], e["E"], e["N"], e["K"], e["dtype"]) for e in doc["entries"]}
    E, H, I = 8, 64, 32  # tune.TINY
    assert kinds == {("moe_gemm", E, I, H, "float32"), ("moe_gemm", E, H, I, "float32"),
                     ("lora_shrink", E, 16, H, "float32"), ("lora_shrink", E, 16, I, "float32"),
                     ("lora_expand", E, I, 16, "float32"), ("lora_expand", E, H, 16, "float32")}
    by = {(e["kernel"], e["N"], e["K"]): e["buckets"] for e in doc["entries"]}
    assert set(by[("moe_gemm", I, H)]) == {"2", "16"}  # T = 1 and 8 at top-2
    tiles.reload_tables()
    for pairs in (2, 16):
        c = by[("moe_gemm", I, H)][str(pairs)]
        got = tiles.moe_gemm_tiles(pairs, E, I, H, F32, CPU)
        assert got == tiles.GemmTiles(tiles.moe_block_m(pairs, E), c["BN"], c["BK"], c["num_warps"], c["num_stages"])
        assert c["BM"] == tiles.moe_block_m(pairs, E)
        bm = c["BM"]
        c = by[("lora_shrink", 16, H)][str(pairs)]
        assert tiles.lora_shrink_tiles(pairs, E, H, bm, F32, CPU) == tiles.LoraTiles(c["BK"], c["num_warps"], c["num_stages"])
        c = by[("lora_expand", H, 16)][str(pairs)]
        assert tiles.lora_expand_tiles(pairs, E, H, bm, F32, CPU) == tiles.LoraTiles(c["BN"], c["num_warps"], c["num_stages"])
        # tuned at another BM (another alignment): not used
        assert tiles.lora_expand_tiles(pairs, E, H, 64, F32, CPU) == tiles.LoraTiles(tiles.lora_expand_bn(H, F32))
    # no entry for that shape, dtype or device: the heuristics
    assert tiles.moe_gemm_tiles(16, E, I, 128, F32, CPU) == tiles.moe_gemm_heuristic(16, E, I, 128, F32, CPU)
    assert tiles.moe_gemm_tiles(16, E, I, H, torch.bfloat16, CPU) == tiles.moe_gemm_heuristic(16, E, I, H, torch.bfloat16, CPU)
    assert tiles.lora_shrink_tiles(16, E, 128, 16, F32, CPU) == tiles.LoraTiles(tiles.lora_shrink_bk(128, F32))
    assert tiles.lora_expand_tiles(16, 4, H, 16, F32, CPU) == tiles.LoraTiles(tiles.lora_expand_bn(H, F32))


def test_nearest_bucket_and_device_name(table_dir):
    cfg = lambda bn: {"BN": bn, "BK": 16, "num_warps": 4, "num_stages": 2}  # noqa: E731
    write_table(table_dir, [gemm_entry(4, 24, 40, {"2": cfg(16), "64": cfg(32), "512": cfg(64)})])
    write_table_other = table_dir / "other.json"
    write_table_other.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3",
                                             "entries": [gemm_entry(4, 24, 40, {"2": cfg(128)})]}))
    tiles.reload_tables()
    bn = lambda n: tiles.moe_gemm_tiles(n, 4, 24, 40, F32, CPU).BN  # noqa: E731
    assert [bn(n) for n in (1, 2, 20, 33, 34, 64, 200, 300, 10_000)] == [16, 16, 16, 16, 32, 32, 32, 64, 64]
    # the alignment's BM whatever the table says
    assert tiles.moe_gemm_tiles(300, 4, 24, 40, F32, CPU).BM == tiles.moe_block_m(300, 4)
    # only buckets tuned at the launch's BM qualify (BM 16 up to 64 pairs over 4 experts, then 32, 64)
    write_table(table_dir, [gemm_entry(4, 24, 40, {"2": dict(cfg(16), BM=16), "512": dict(cfg(64), BM=64)})])
    tiles.reload_tables()
    assert [bn(n) for n in (2, 64, 100, 300, 512)] == [16, 16, tiles.moe_gemm_heuristic(100, 4, 24, 40, F32, CPU).BN, 64, 64]
    # LoRA launch options: Triton's default stages when the heuristic applies
    assert tiles.LoraTiles(32).launch_kwargs() == {"num_warps": 4}
    assert tiles.LoraTiles(32, 8, 3).launch_kwargs() == {"num_warps": 8, "num_stages": 3}


@pytest.mark.parametrize("lora", [False, True])
def test_launchers_use_the_table_and_stay_exact(table_dir, triton_on, lora, monkeypatch):
    if triton_on.type != "cpu":
        pytest.skip("the table written here is the CPU interpreter's")
    T, K, E, H, I = 7, 2, 5, 48, 32
    g = {"BN": 16, "BK": 16, "num_warps": 2, "num_stages": 2}  # none of them the heuristic's
    write_table(table_dir, [gemm_entry(E, I, H, {"14": g}), gemm_entry(E, H, I, {"14": g}),
                            {"kernel": "lora_shrink", "E": E, "N": 16, "K": H, "dtype": "float32",
                             "buckets": {"14": {"BK": 16, "num_warps": 2, "num_stages": 2}}},
                            {"kernel": "lora_shrink", "E": E, "N": 16, "K": I, "dtype": "float32",
                             "buckets": {"14": {"BK": 16, "num_warps": 2, "num_stages": 2}}}])
    tiles.reload_tables()
    assert tiles.moe_gemm_tiles(T * K, E, I, H, F32, CPU).BK == 16 != tiles.moe_gemm_heuristic(T * K, E, I, H, F32, CPU).BK
    seen = []
    import kernels.moe_lora as ml

    orig = ml.lora_shrink_tiles
    monkeypatch.setattr(ml, "lora_shrink_tiles", lambda *a: seen.append(orig(*a)) or seen[-1])
    args = make_moe(T, K, E, H, I, F32, "cpu")
    layer = make_moe_lora(3, E, H, I, F32, "cpu") if lora else None
    slots = torch.tensor([0, 1, -1, 2, 0, 1, -1], dtype=torch.int32) if lora else None
    assert_close(fused_moe(*args, layer, slots), fused_moe_torch(*args, layer, slots), F32)
    if lora:
        assert seen and all(t == tiles.LoraTiles(16, 2, 2) for t in seen)
