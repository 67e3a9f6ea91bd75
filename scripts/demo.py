"""The main job, end to end on the bundled tiny model (CPU is enough):

1. train DR-LoRA adapters for two demo tasks with `drlora-train`;
2. start `drlora-serve` with them on 127.0.0.1;
3. ask the base and each adapter through the official `openai` client, show that each adapter
   does its task and the base does not (exact match on held-out examples);
4. train a third adapter and hand it to the running server (`drlora-train --push`), then use it;
5. stop the server.

Run through `bash scripts/demo.sh` (installs first) or `python scripts/demo.py` in the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FIRST, SECOND, THIRD = "lookup", "flip", "caps"  # demo tasks (examples/<task>.train.jsonl)


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def bin_path(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        sys.exit(f"demo: error: {name} is not installed (run `bash scripts/demo.sh`)")
    return found


def load_jsonl(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def train(task: str, out: Path, steps: int, push: str | None = None) -> float:
    cmd = [bin_path("drlora-train"), "--model", "tiny", "--data", str(EXAMPLES / f"{task}.train.jsonl"),
           "--eval-data", str(EXAMPLES / f"{task}.test.jsonl"), "--output", str(out),
           "--max-steps", str(steps), "--lr", "3e-3", "--batch-size", "16",
           "--r-init", "4", "--r-target", "8", "--r-max", "16", "--t-grow", str(max(1, steps // 10)),
           "--t-buffer", str(max(1, steps // 10)), "--eval-max-examples", "50", "--no-progress"]
    if push:
        cmd += ["--push", push]
    t0 = time.time()
    print("$ " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"demo: error: drlora-serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("demo: error: drlora-serve did not become healthy in time")


def score(client, model: str, rows: list[dict]) -> tuple[float, list[str]]:
    """Exact match of greedy completions, and the first few outputs."""
    outs = []
    for i in range(0, len(rows), 16):  # a list prompt is one request, batched by the engine
        batch = rows[i:i + 16]
        r = client.completions.create(model=model, prompt=[x["prompt"] for x in batch],
                                      max_tokens=16, temperature=0, stop=["\n"])
        outs += [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    hits = sum(o.strip() == x["completion"].strip() for o, x in zip(outs, rows))
    return hits / len(rows), outs


def show(client, models: list[str], task: str, n_eval: int) -> dict[str, float]:
    rows = load_jsonl(EXAMPLES / f"{task}.test.jsonl", n_eval)
    acc = {}
    for m in models:
        acc[m], outs = score(client, m, rows)
        print(f"  {task:>8} via {m:<10} exact match {acc[m]:6.1%}   e.g. "
              f"{rows[0]['prompt']!r} -> {outs[0].strip()!r} (want {rows[0]['completion'].strip()!r})")
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval", type=int, default=48, help="held-out examples scored per task")
    args = ap.parse_args()
    t_start = time.time()
    work = Path(args.workdir)
    adapters = work / "adapters"
    shutil.rmtree(work, ignore_errors=True)
    adapters.mkdir(parents=True)
    from openai import OpenAI

    times = {}
    for task in (FIRST, SECOND):
        say(f"training a DR-LoRA adapter for '{task}'")
        times[task] = train(task, adapters / task, args.steps)

    say("starting drlora-serve with both adapters")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([bin_path("drlora-serve"), "--model", "tiny", "--adapters", str(adapters),
                               "--host", "127.0.0.1", "--port", str(port),
                               "--lora-root", str(work)],
                              start_new_session=True)
    try:
        wait_healthy(url, server)
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        print("  models:", [m.id for m in client.models.list().data])
        say("each adapter does its task, the base does not")
        results = {t: show(client, ["tiny", t], t, args.eval) for t in (FIRST, SECOND)}
        cross = show(client, [SECOND], FIRST, 16)  # an adapter is not a general skill
        results[FIRST].update({f"{SECOND} (wrong adapter)": cross[SECOND]})

        say(f"training a third adapter '{THIRD}' and pushing it into the running server")
        third = work / "pushed" / THIRD
        times[THIRD] = train(THIRD, third, args.steps, push=url)
        print("  models:", [m.id for m in client.models.list().data])
        results[THIRD] = show(client, ["tiny", THIRD], THIRD, args.eval)

        say("one batch, three adapters and the base at once")
        rows = {t: load_jsonl(EXAMPLES / f"{t}.test.jsonl", 1)[0] for t in (FIRST, SECOND, THIRD)}
        from concurrent.futures import ThreadPoolExecutor

        jobs = [(m, rows[t]) for t in rows for m in (t, "tiny")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            outs = list(pool.map(lambda j: client.completions.create(
                model=j[0], prompt=j[1]["prompt"], max_tokens=16, temperature=0, stop=["\n"]
            ).choices[0].text, jobs))
        for (m, row), out in zip(jobs, outs):
            print(f"  {m:<8} {row['prompt']!r} -> {out.strip()!r}")
    finally:
        say("stopping the server")
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)

    say("summary")
    for task, acc in results.items():
        print(f"  {task:>8}: " + ", ".join(f"{m} {a:.1%}" for m, a in acc.items()))
    print("  training seconds: " + ", ".join(f"{t} {s:.0f}" for t, s in times.items()))
    print(f"  total {time.time() - t_start:.0f} s; adapters in {adapters} and {work / 'pushed'}")


if __name__ == "__main__":
    main()
