"""HTTP load generator for drlora-serve (or any OpenAI-compatible server).

N concurrent streaming /v1/completions requests over mixed adapters, bounded by a request
count and a time limit; reports output tok/s, req/s, time to first token and inter-token
latency (p50/p99), prints a table and writes JSON with device, date and versions.

    # against a running server
    python benchmarks/serve.py --url http://127.0.0.1:8000 --models a1,a2,olmoe -c 32 -n 256
    # start one itself (tiny on CPU, 4 random adapters)
    python benchmarks/serve.py --model tiny --make-adapters 4 -c 8 -n 64 --max-tokens 32
    # on a GPU at OLMoE-1B-7B shapes, random weights (--load-format dummy), 16 adapters with
    # DR-LoRA-like ranks 8..32, no checkpoint needed (--dummy-olmoe is --dummy olmoe)
    python benchmarks/serve.py --dummy olmoe --make-adapters 16 -c 64 -n 512 --max-tokens 128
    # at Qwen3-30B-A3B shapes (4 adapters fit beside the 57 GiB of weights on an 80 GB GPU)
    python benchmarks/serve.py --dummy qwen3-moe --make-adapters 4 -c 64 -n 512 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = ("the cat sat on a mat while the dog ran in the park and a bird sang songs of "
         "morning light over quiet hills near the old river").split()


@dataclass
class Result:
    ok: bool
    model: str
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, args, seed: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "stream": True,
            "temperature": 1.0, "seed": seed, "ignore_eos": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res = Result(ok=False, model=model)
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if not chunk.get("choices"):
                    continue
                lp = chunk["choices"][0].get("logprobs") or {}
                k = len(lp.get("tokens") or []) or (1 if chunk["choices"][0]["text"] else 0)
                if not k:
                    continue
                now = time.perf_counter()
                if last is None:  # the first token is TTFT; any arriving with it: gap 0
                    res.ttft = now - t0
                    res.itls += [0.0] * (k - 1)
                else:  # a chunk of k tokens: k gaps sharing the time since the last chunk
                    res.itls += [(now - last) / k] * k
                res.tokens += k
                last = now
        res.latency = time.perf_counter() - t0
        res.ok = True
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_load(url: str, models: list[str], args) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    results: list[Result] = []
    counter = iter(range(args.num_requests))
    deadline = time.perf_counter() + args.duration

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits, headers=headers) as client:
        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
                results.append(await one(client, url, models[i % len(models)], prompt, args, args.seed + i))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        return results, time.perf_counter() - t0


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    toks = sum(r.tokens for r in ok)
    itl = [x for r in ok for x in r.itls]
    ttft = [r.ttft for r in ok]
    return {
        "requests": len(results), "failed": len(results) - len(ok), "elapsed_s": round(elapsed, 3),
        "output_tokens": toks, "output_tok_s": round(toks / elapsed, 2) if elapsed else 0.0,
        "req_s": round(len(ok) / elapsed, 3) if elapsed else 0.0,
        "ttft_p50_ms": round(pct(ttft, 50) * 1e3, 2), "ttft_p99_ms": round(pct(ttft, 99) * 1e3, 2),
        "itl_p50_ms": round(pct(itl, 50) * 1e3, 2), "itl_p99_ms": round(pct(itl, 99) * 1e3, 2),
        "e2e_p50_s": round(pct([r.latency for r in ok], 50), 3),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dummy_folder(alias: str) -> Path:
    """A model folder with a preset's config (drlora.models.PRESETS) and the tiny model's
    tokenizer (ids < 849, inside every vocab): served with --load-format dummy, random weights."""
    from drlora.models import dummy_model_dir

    return dummy_model_dir(alias)


def make_adapters(folder: Path, k: int, model: str, dr_lora_like: bool = False) -> list[str]:
    """k random adapters; ranks 0..8 per expert, or (dr_lora_like) benchmarks/engine.py's 8..32
    skewed ranks with mean 16, in bf16."""
    import torch

    from drlora.adapter_format import AdapterConfig, expected_shapes, write_adapter
    from drlora.models import MoeShape, resolve_model

    shape = MoeShape.from_model_dir(resolve_model(model))
    names = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        if dr_lora_like:
            from engine import dr_lora_ranks  # benchmarks/engine.py: the same distribution

            ranks = dr_lora_ranks(shape, 1000 + i)
        else:
            ranks = {p: torch.randint(0, 9, (shape.num_hidden_layers, shape.num_experts), generator=g).tolist()
                     for p in ("gate", "up", "down")}
        dtype = "bfloat16" if dr_lora_like else "float32"
        cfg = AdapterConfig(base_model=model, base_shape=shape, method="drlora", scaling=1.0, ranks=ranks, dtype=dtype)
        tensors = {n: (torch.randn(*s, generator=g) * 0.02).to(getattr(torch, dtype))
                   for n, s in expected_shapes(cfg).items()}
        write_adapter(folder / f"bench{i}", cfg, tensors)
        names.append(f"bench{i}")
    return names


def start_server(args, adapters_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--adapters", str(adapters_dir), "--log-level", "warning",
           *args.server_args.split()]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def environment(local: bool) -> dict:
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count()}
    try:
        from importlib.metadata import version

        for pkg in ("drlora", "torch", "fastapi", "uvicorn", "httpx"):
            env[pkg] = version(pkg)
    except Exception:  # noqa: BLE001
        pass
    if local:
        try:
            import torch

            env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
        except Exception:  # noqa: BLE001
            env["device"] = "unknown"
    else:
        env["device"] = "remote (see the server)"
    return env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; else one is started with --model")
    p.add_argument("--model", default="tiny")
    p.add_argument("--models", default=None, help="comma-separated model fields to cycle through "
                   "(default: every model the server lists)")
    p.add_argument("--make-adapters", type=int, default=4, help="random adapters for a started server")
    p.add_argument("--dummy", default=None, metavar="PRESET", help="start a server at a preset's shapes (olmoe, "
                   "qwen3-moe, qwen2-moe, mixtral) with random weights (--load-format dummy) and DR-LoRA-like "
                   "adapters (ranks 8..32)")
    p.add_argument("--dummy-olmoe", action="store_true", help="same as --dummy olmoe")
    p.add_argument("--server-args", default="", help="extra drlora-serve flags for a started server")
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("-n", "--num-requests", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="stop issuing requests after this many seconds")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("DRLORA_API_KEY"))
    p.add_argument("--out", default="bench-serve.json")
    args = p.parse_args(argv)
    if args.dummy_olmoe:
        args.dummy = "olmoe"

    proc, tmp = None, None
    url = args.url
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="drlora-bench-")
        if args.dummy:
            args.model = str(dummy_folder(args.dummy))
            from drlora.models import MoeShape

            E = MoeShape.from_model_dir(args.model).num_experts
            k = max(args.make_adapters, 1)  # all resident at once: pool rows for mean rank 16 plus slack
            args.server_args += f" --load-format dummy --max-loras {k} --lora-pool-rank-rows {k * E * 20}"
            adapters = Path(tmp.name) / "adapters"
        else:
            adapters = Path(tmp.name)
        make_adapters(adapters, args.make_adapters, args.model, dr_lora_like=args.dummy is not None)
        proc, url = start_server(args, adapters)
    try:
        if args.models:
            models = args.models.split(",")
        else:
            h = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            models = [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]]
        results, elapsed = asyncio.run(run_load(url, models, args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    summary = summarize(results, elapsed)
    report = {"env": environment(local=args.url is None),
              "config": {k: v for k, v in vars(args).items() if k != "api_key"} | {"models": models},
              "results": summary,
              "per_model": {m: summarize([r for r in results if r.model == m], elapsed) for m in models}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'metric':<16}{'value':>12}")
    for k in ("requests", "failed", "elapsed_s", "output_tokens", "output_tok_s", "req_s",
              "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_s"):
        print(f"{k:<16}{summary[k]:>12}")
    if summary["errors"]:
        print("errors:", *summary["errors"], sep="\n  ")
    print(f"device: {report['env']['device']}  models: {','.join(models)}  -> {args.out}")


if __name__ == "__main__":
    main()
