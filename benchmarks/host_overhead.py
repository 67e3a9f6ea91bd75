"""Host overhead of the serving loop: the real engine and the real server, with a STUB MODEL.

The model's forward and logits are replaced by a stub that costs nothing (views of
preallocated tensors), so that only the engine's and the server's own work remains:
scheduling, input preparation, sampling, detokenization, outputs, IPC and HTTP. Each step
still samples distinct tokens (the stub's logits cycle through random tables), so
detokenization does real work. Decode-dominated, as a new user would try it: 8-token
prompts, 256 tokens out, `ignore_eos`, greedy. What it does NOT measure: any model compute.

Two modes:
- `--device-ms 0`: the host's own cost per step.
- `--device-ms D`: an emulated asynchronous device, the way CUDA behaves: launching a step
  returns at once, and the first read of the step's results (the sampled tokens) waits until
  D ms after the launch (after the previous step's end, if that is later: the device runs
  one step at a time). D = 4.6 is an H100 decode step at OLMoE-1B-7B shapes and batch 64
  (13.8 GB of weights at 3 TB/s); D = 6 stands for batch 256.

Offline: `LLM.generate` at batch 1/64/256. HTTP: the real `drlora-serve` (stub model inside)
with 1/64/256 concurrent streaming clients; tokens are counted from `usage`
(`stream_options.include_usage`). The client is a lean raw-socket HTTP/1.1 reader so that it
takes as little of the machine's CPU as possible. Also: how long `/health` and a short
completion take while a 10 MB prompt is being tokenized.

    python benchmarks/host_overhead.py --out host.json
    python benchmarks/host_overhead.py --device-ms 0 4.6 --batches 64 --concurrency 64
    python benchmarks/host_overhead.py --device-ms 0 4.6 --batches 64 --skip-http --big-prompt-mb 0 \
        --constrained-fraction 0.5            # half the rows JSON-schema constrained (--schema FILE|JSON)

Prints a table; `--out FILE` writes
`{"offline": [{"batch", "device_ms", "host_ms_per_step", "tok_s", ...}],
  "http": [{"concurrency", "device_ms", "stream", "tok_s", ...}], "responsiveness": {...}, "meta": {...}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repo, uninstalled

import torch  # noqa: E402

PROMPT_LEN = 8
OUTPUT_LEN = 256
NUM_TABLES = 64  # logits tables the stub cycles through
# --constrained-fraction's default schema: a record with free-text fields, so that random
# logits keep the document going (inside strings) for all OUTPUT_LEN tokens
DEFAULT_SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "notes": {"type": "string"}}, "required": ["id", "name", "tags", "notes"]}


# ---------------------------------------------------------------------------- the stub model
class EmulatedEvent:
    """A step's completion on the emulated device: done `device_ms` after its launch."""

    def __init__(self, done_at: float):
        self.done_at = done_at

    def synchronize(self) -> None:
        wait_until(self.done_at)


class StubModel:
    """Stands in for the model: forward and logits are views of preallocated tensors (no
    compute). With DRLORA_STUB_DEVICE_MS > 0 its steps complete on an emulated device: the
    runner's completion event for a step launched at t is done at t + device_ms."""

    def __init__(self, vocab: int, max_tokens: int, max_positions: int, device_ms: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.max_positions = max_positions
        self.kv_caches = []
        self.hidden = torch.zeros(max_tokens, 1)
        self.tables = torch.randn(NUM_TABLES, max_tokens, vocab, generator=g)
        self.calls = itertools.count()
        self.device_ms = device_ms
        self.launched_at = 0.0
        self.device_free_at = 0.0  # when the emulated device finishes the last launched step

    @classmethod
    def random(cls, config: dict, dtype, device, seed: int = 0) -> StubModel:
        """`drlora-serve --model-class benchmarks.host_overhead:StubModel --load-format dummy`."""
        return cls(config["vocab_size"], 8192, config.get("max_position_embeddings", 4096),
                   float(os.environ.get("DRLORA_STUB_DEVICE_MS", "0")), seed)

    def forward(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        self.launched_at = time.perf_counter()
        return self.hidden[:input_ids.shape[0]]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tables[next(self.calls) % NUM_TABLES, :hidden.shape[0]]

    def record_event(self) -> EmulatedEvent | None:
        """Steps run one after another on the device: a step starts when it is launched and the
        previous one is done, and takes device_ms."""
        if self.device_ms <= 0:
            return None
        self.device_free_at = max(self.launched_at, self.device_free_at) + self.device_ms / 1000
        return EmulatedEvent(self.device_free_at)


def wait_until(t: float) -> None:
    """Sleep until perf_counter() >= t (sleep, then spin the last 0.2 ms, like a spinning sync)."""
    rest = t - time.perf_counter()
    if rest > 3e-4:
        time.sleep(rest - 2e-4)
    while time.perf_counter() < t:
        pass


class Phases:
    """Host time per phase of the engine's step, decode steps only."""

    def __init__(self):
        self.t = defaultdict(float)
        self.decode_steps = 0
        self.decode_host = 0.0
        self.cur: dict[str, float] = defaultdict(float)

    def add(self, name: str, dt: float) -> None:
        self.cur[name] += dt

    def end_step(self, total: float, decode: bool) -> None:
        cur, self.cur = self.cur, defaultdict(float)
        wait = cur.pop("wait", 0.0)
        if not decode:
            return
        self.decode_steps += 1
        self.decode_host += total - wait
        known = sum(cur.values())
        for k, v in cur.items():
            self.t[k] += v
        self.t["outputs"] += total - wait - known

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.decode_steps, 1)
        return {k: 1000 * v / n for k, v in sorted(self.t.items())}


def _timed(obj, name: str, phases: Phases, label: str, minus: str | None = None) -> None:
    """Time obj.name under `label` (less the time spent meanwhile in phase `minus`)."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        before = phases.cur[minus] if minus else 0.0
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            inner = (phases.cur[minus] - before) if minus else 0.0
            phases.add(label, time.perf_counter() - t0 - inner)

    setattr(obj, name, wrapper)


def build_engine(device_ms: float, max_num_seqs: int = 256):
    """The real engine (scheduler, block manager, adapter pool, sampler, output processor and
    detokenizer) around the stub model, instrumented per phase; the emulated device when
    device_ms > 0."""
    from transformers import AutoTokenizer

    from drlora.models import resolve_model
    from drlora_serve.config import EngineArgs
    from drlora_serve.engine import LLMEngine
    from drlora_serve.model_runner import LaunchedStep, ModelRunner

    tiny = resolve_model("tiny")
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the stub uses no KV; one layer keeps the cache small
    per_seq_blocks = -(-(PROMPT_LEN + OUTPUT_LEN) // 16)
    args = EngineArgs(model=str(tiny), device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=4096, num_kv_blocks=max_num_seqs * per_seq_blocks + 64,
                      max_loras=1, lora_pool_rank_rows=16, lora_dense_rank_rows=16)
    stub = StubModel(cfg["vocab_size"], 4096 + max_num_seqs, cfg["max_position_embeddings"], device_ms)
    runner = ModelRunner(args, tiny, model=stub, config=cfg)
    engine = LLMEngine(args, model_dir=tiny, runner=runner, tokenizer=AutoTokenizer.from_pretrained(str(tiny)))
    phases = Phases()
    _timed(engine.scheduler, "schedule", phases, "schedule")
    _timed(runner, "prepare", phases, "prepare")
    # structured outputs: matchers advanced with each step's tokens, masks filled (host work)
    _timed(engine.core, "_advance_grammars", phases, "grammar_advance")
    _timed(engine.core.grammars, "fill", phases, "grammar_fill")
    sampler = runner.sampler

    def timed_sampler(logits, batch, *extra):
        t0 = time.perf_counter()
        try:
            return sampler(logits, batch, *extra)
        finally:
            phases.add("sample", time.perf_counter() - t0)

    runner.sampler = timed_sampler
    wait = LaunchedStep.wait

    def timed_wait(self):  # the host blocks on the device here; the rest is reading results
        ev, self.event = self.event, None
        t0 = time.perf_counter()
        if ev is not None:
            ev.synchronize()
        phases.add("wait", time.perf_counter() - t0)
        return wait(self)

    LaunchedStep.wait = timed_wait
    step = engine.step

    def timed_step():
        # a decode step: everything running is past its prefill and nothing waits to be admitted
        decode = bool(engine.scheduler.running) and not engine.scheduler.num_waiting and \
            all(not s.in_prefill for s in engine.scheduler.running)
        t0 = time.perf_counter()
        out = step()
        phases.end_step(time.perf_counter() - t0, decode)
        return out

    engine.step = timed_step
    return engine, phases


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(PROMPT_LEN)] for _ in range(n)]


# ---------------------------------------------------------------------------- offline
def run_offline(batch: int, device_ms: float, constrained: float = 0.0, schema: dict | None = None) -> dict:
    """constrained: the fraction of the rows whose output is constrained to `schema` (JSON)."""
    from drlora_serve.llm import LLM
    from drlora_serve.types import SamplingParams, StructuredOutputsParams

    engine, phases = build_engine(device_ms)
    llm = LLM.from_engine(engine)
    vocab = engine.runner.config["vocab_size"]
    sp = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True)
    nc = round(batch * constrained)
    csp = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True,
                         structured_outputs=StructuredOutputsParams(json=schema or DEFAULT_SCHEMA))
    params = [csp if i % batch < nc else sp for i in range(batch)] if nc else sp
    llm.generate(random_prompts(min(batch, 4), vocab, 1), [csp if nc else sp, sp, sp, sp][:min(batch, 4)])  # warm up
    phases.__init__()
    t0 = time.perf_counter()
    outs = llm.generate(random_prompts(batch, vocab, 2), params)
    wall = time.perf_counter() - t0
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    assert ntok == batch * OUTPUT_LEN, ntok
    return {"batch": batch, "device_ms": device_ms, "constrained_rows": nc,
            "host_ms_per_step": 1000 * phases.decode_host / max(phases.decode_steps, 1),
            "tok_s": ntok / wall, "decode_steps": phases.decode_steps, "wall_s": wall,
            "phases_ms_per_step": phases.per_step_ms()}


# ---------------------------------------------------------------------------- HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_request(port: int, path: str, body: dict | None) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection (Connection: close); (status, de-chunked body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    method = "POST" if body is not None else "GET"
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    chunks = []
    while True:
        b = await reader.read(1 << 16)
        if not b:
            break
        chunks.append(b)
    writer.close()
    raw = b"".join(chunks)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, i = [], 0
        while True:
            j = rest.index(b"\r\n", i)
            n = int(rest[i:j], 16)
            if n == 0:
                break
            out.append(rest[j + 2:j + 2 + n])
            i = j + 2 + n + 2
        rest = b"".join(out)
    return status, rest


def usage_tokens(sse: bytes) -> int:
    events = [e[6:] for e in sse.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {sse[-200:]!r}")
    usage = json.loads(events[-2]).get("usage")
    if not usage:
        raise RuntimeError("no usage in the last chunk")
    return usage["completion_tokens"]


async def http_round(port: int, concurrency: int, requests_per_client: int, vocab: int, seed: int) -> tuple[int, float]:
    prompts = random_prompts(concurrency * requests_per_client, vocab, seed)

    async def client(c: int) -> int:
        total = 0
        for r in range(requests_per_client):
            body = {"model": "tiny", "prompt": prompts[c * requests_per_client + r], "max_tokens": OUTPUT_LEN,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            status, sse = await http_request(port, "/v1/completions", body)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {sse[:300]!r}")
            total += usage_tokens(sse)
        return total

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(client(c) for c in range(concurrency)))
    return sum(counts), time.perf_counter() - t0


def start_server(device_ms: float, log: Path, extra: list[str] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    blocks = 256 * -(-(PROMPT_LEN + OUTPUT_LEN) // 16) + 64
    cmd = [sys.executable, "-m", "server.cli", "--model", "tiny", "--port", str(port), "--load-format", "dummy",
           "--model-class", "benchmarks.host_overhead:StubModel", "--max-num-seqs", "256",
           "--num-kv-blocks", str(blocks), "--log-level", "warning", *extra]
    env = {**os.environ, "DRLORA_STUB_DEVICE_MS": str(device_ms),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            status, _ = asyncio.run(http_request(port, "/health", None))
            if status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_http(concurrencies: list[int], device_ms: float, vocab: int, log: Path) -> list[dict]:
    proc, port = start_server(device_ms, log)
    rows = []
    try:
        asyncio.run(http_round(port, 4, 1, vocab, 0))  # warm up
        for c in concurrencies:
            rpc = 2 if c <= 64 else 1
            ntok, wall = asyncio.run(http_round(port, c, rpc, vocab, c))
            assert ntok == c * rpc * OUTPUT_LEN, ntok
            rows.append({"concurrency": c, "device_ms": device_ms, "stream": True, "tok_s": ntok / wall,
                         "requests": c * rpc, "wall_s": wall})
    finally:
        stop_server(proc)
    return rows


async def _probe_while(port: int, body: dict) -> dict:
    """Latencies of /health and of a short completion, probed back to back while `body` is served."""
    task = asyncio.create_task(http_request(port, "/v1/completions", body))
    await asyncio.sleep(0.05)  # let the big body arrive
    health, short = [], []
    t0 = time.perf_counter()
    while not task.done():
        t = time.perf_counter()
        await http_request(port, "/health", None)
        health.append(time.perf_counter() - t)
        t = time.perf_counter()
        await http_request(port, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4,
                                                     "temperature": 0})
        short.append(time.perf_counter() - t)
    status, _ = await task
    return {"status": status, "seconds": time.perf_counter() - t0, "probes": len(health),
            "health_max_ms": 1000 * max(health, default=0), "short_completion_max_ms": 1000 * max(short, default=0)}


async def _responsiveness(port: int, mb: float) -> dict:
    text = "dave:26 frank:56. "
    one = {"model": "tiny", "prompt": text * int(mb * (1 << 20) / len(text)), "max_tokens": 1}
    # the same megabytes as many prompts that each fit the context: all really tokenized (and run)
    part = text * 40  # 720 characters, about 360 tokens: fits the 512-token context
    many = {"model": "tiny", "prompt": [part] * int(mb * (1 << 20) / len(part)), "max_tokens": 1}
    return {"prompt_mb": mb, "one_prompt": await _probe_while(port, one),
            "many_prompts": {"count": len(many["prompt"]), **await _probe_while(port, many)}}


def run_responsiveness(mb: float, log: Path) -> dict:
    proc, port = start_server(0.0, log, ["--max-prompts-per-request", "100000"])
    try:
        return asyncio.run(_responsiveness(port, mb))
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-ms", type=float, nargs="+", default=[0.0, 4.6, 6.0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--big-prompt-mb", type=float, default=10.0, help="0: skip the responsiveness probe")
    ap.add_argument("--constrained-fraction", type=float, default=0.0,
                    help="offline: this fraction of the rows is constrained to --schema (structured outputs)")
    ap.add_argument("--schema", default=None, help="JSON schema (a file or JSON text) for --constrained-fraction")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    from drlora.models import resolve_model

    vocab = json.loads((resolve_model("tiny") / "config.json").read_text())["vocab_size"]
    res = {"offline": [], "http": [], "responsiveness": None}
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "host_overhead_server.log"
    schema = None
    if args.schema:
        schema = json.loads(Path(args.schema).read_text() if Path(args.schema).is_file() else args.schema)
    if not args.skip_offline:
        for d in args.device_ms:
            for b in args.batches:
                row = run_offline(b, d, args.constrained_fraction, schema)
                res["offline"].append(row)
                ph = " ".join(f"{k} {v:.3f}" for k, v in row["phases_ms_per_step"].items())
                print(f"offline batch {b:>4} device {d:>4} ms constrained {row['constrained_rows']:>3}: host {row['host_ms_per_step']:7.3f} ms/step "
                      f"{row['tok_s']:>9.0f} tok/s   [{ph}]", flush=True)
    if not args.skip_http:
        for d in args.device_ms:
            for row in run_http(args.concurrency, d, vocab, log):
                res["http"].append(row)
                print(f"http  clients {row['concurrency']:>4} device {d:>4} ms: {row['tok_s']:>9.0f} tok/s", flush=True)
    if args.big_prompt_mb > 0:
        res["responsiveness"] = r = run_responsiveness(args.big_prompt_mb, log)
        for k, what in (("one_prompt", "one prompt"), ("many_prompts", f"{r['many_prompts']['count']} prompts")):
            x = r[k]
            print(f"while {r['prompt_mb']:g} MB as {what} is served ({x['seconds']:.1f} s, HTTP {x['status']}): "
                  f"/health max {x['health_max_ms']:.0f} ms, short completion max "
                  f"{x['short_completion_max_ms']:.0f} ms ({x['probes']} probes)", flush=True)
    res["meta"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "cpu_count": os.cpu_count(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                   "stub_model": True, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN}
    print()
    print(f"{'path':<10}{'batch/clients':>14}{'device ms':>10}{'host ms/step':>14}{'tok/s':>10}")
    for r in res["offline"]:
        print(f"{'offline':<10}{r['batch']:>14}{r['device_ms']:>10g}{r['host_ms_per_step']:>14.3f}{r['tok_s']:>10.0f}")
    for r in res["http"]:
        print(f"{'http':<10}{r['concurrency']:>14}{r['device_ms']:>10g}{'':>14}{r['tok_s']:>10.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
