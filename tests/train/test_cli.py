import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from drlora.adapter_format import read_adapter, write_adapter
from drlora.models import resolve_model, weights_fingerprint
from drlora_train.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "arith.jsonl"


def _serve_once(calls, status: int = 200, reply: bytes = b"{}"):
    """A server for one POST that records (path, Authorization, JSON body) and answers `status`."""
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append((self.path, self.headers.get("Authorization"), json.loads(body)))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.handle_request, daemon=True).start()
    return srv


def test_example_command_end_to_end(tmp_path, capsys):
    calls = []
    srv = _serve_once(calls)
    out = tmp_path / "adapters" / "arith"
    rc = main(["--model", "tiny", "--data", str(EXAMPLE), "--output", str(out), "--max-steps", "8",
               "--r-init", "2", "--r-target", "4", "--r-max", "8", "--lr", "1e-3", "--batch-size", "4",
               "--eval-max-examples", "4", "--eval-max-new-tokens", "4", "--no-progress", "--device", "cpu",
               "--push", f"http://127.0.0.1:{srv.server_port}", "--api-key", "k"])
    assert rc == 0
    ad = read_adapter(out)
    assert ad.config.method == "drlora" and ad.config.provenance["steps"] == 8
    assert "exact_match" in ad.config.provenance["eval"]
    assert ad.config.provenance["base_fingerprint"] == weights_fingerprint(resolve_model("tiny"))
    assert ad.config.expert_ranks("up").sum(1).tolist() == [64] * 4
    assert (out / "ranks.png").stat().st_size > 1000
    hist = json.loads((out / "rank_history.json").read_text())
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 8
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "rank_total"} <= set(log[1])
    assert calls == [("/v1/load_lora_adapter", "Bearer k",
                      {"lora_name": "arith", "lora_path": str(out.resolve()), "load_inplace": True})]
    assert "push: loaded 'arith'" in capsys.readouterr().out
    # export subcommand on the result
    assert main(["export", "--format", "peft", str(out), str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back"), "--model", "tiny"]) == 0
    assert read_adapter(tmp_path / "back").config.ranks == ad.config.ranks


@pytest.mark.parametrize("args,msg", [
    (["--data", "x.jsonl"], "required: --output"),
    (["--data", "missing.jsonl", "--output", "o", "--r-init", "20"], "r-init <= r-target"),
    (["--data", "missing.jsonl", "--output", "o", "--method", "adalora"], "invalid choice"),
    (["--data", "missing.jsonl", "--output", "o", "--targets", "up,qkv"], "--targets"),
    (["--data", "missing.jsonl", "--output", "o", "--max-steps", "1"], "missing.jsonl: no such file"),
    (["export", "--format", "peft", "nowhere", "o"], "nowhere is not a folder"),
    # non-finite and out-of-range floats (NaN passes `x <= 0`)
    (["--data", "d.jsonl", "--output", "o", "--gamma", "nan"], "--gamma must be a finite number >= 0, got nan"),
    (["--data", "d.jsonl", "--output", "o", "--gamma", "inf"], "--gamma must be a finite number"),
    (["--data", "d.jsonl", "--output", "o", "--alpha", "nan"], "--alpha must be a finite number > 0"),
    (["--data", "d.jsonl", "--output", "o", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["--data", "d.jsonl", "--output", "o", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["--data", "d.jsonl", "--output", "o", "--max-grad-norm", "nan"], "--max-grad-norm must be a finite"),
    (["--data", "d.jsonl", "--output", "o", "--max-grad-norm", "-1"], "--max-grad-norm must be a finite"),
    (["--data", "d.jsonl", "--output", "o", "--log-every", "0"], "--log-every must be >= 1"),
    (["--data", "d.jsonl", "--output", "o", "--device", "foo"], "--device must be auto, cpu, cuda"),
    (["--data", "d.jsonl", "--output", "o", "--device", "mps"], "--device must be auto, cpu, cuda"),
    (["--data", "d.jsonl", "--output", "o", "--device", "meta"], "--device must be auto, cpu, cuda"),
    (["--data", "d.jsonl", "--output", "o", "--seed", str(2**64)], "--seed must fit in 64 bits"),
    (["--data", "d.jsonl", "--output", "o", "--push", "notaurl"], "--push must be an http(s) URL"),
    (["--data", "d.jsonl", "--output", ""], "--output must name a folder"),
    (["--data", "d.jsonl", "--output", "afile"], "--output afile is a file, not a folder"),
    (["--data", "d.jsonl", "--output", "afile/sub"], "--output afile/sub: Not a directory"),
    (["--data", "d.jsonl", "--output", "o", "--model", "badmodel"], "--model badmodel: unusable"),
    (["--data", "latin1.jsonl", "--output", "o"], "latin1.jsonl:2: not UTF-8 text"),
    (["--data", "d.jsonl", "--eval-data", "latin1.jsonl", "--output", "o"], "latin1.jsonl:2: not UTF-8"),
    (["export", "--format", "peft", "adapter", "afile"], "afile is a file, not a folder"),
])
def test_bad_input_is_one_line_exit_2(args, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(EXAMPLE.read_text())
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "config.json").write_text('{"model_type": "olmoe"')
    if "adapter" in args:
        from tests.core.test_adapter_format import SHAPE, make
        write_adapter(tmp_path / "adapter", *make(SHAPE))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drlora-train: error: ") and msg in err and "\n" not in err


def test_console_script_without_subcommand(tmp_path):
    r = subprocess.run([sys.executable, "-m", "drlora_train.cli", "--data", str(tmp_path / "none.jsonl"),
                        "--output", str(tmp_path / "o"), "--max-steps", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_failed_push_exits_1_with_the_adapter_written(tmp_path, capsys):
    srv = _serve_once([], status=500, reply=b'{"error": "boom"}')
    out = tmp_path / "a"
    rc = main(["--model", "tiny", "--data", str(EXAMPLE), "--output", str(out), "--max-steps", "2",
               "--r-init", "2", "--r-target", "4", "--r-max", "8", "--batch-size", "2", "--eval-max-examples", "0",
               "--no-progress", "--device", "cpu", "--push", f"http://127.0.0.1:{srv.server_port}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and read_adapter(out).config.provenance["steps"] == 2
    assert err.startswith("drlora-train: error: push: ") and "(HTTP 500)" in err and "adapter is written in" in err


def test_push_to_nothing_raises(tmp_path):
    import socket

    from drlora_train.report import PushError, push

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PushError, match=f"push: could not reach http://127.0.0.1:{port} .*adapter is written in"):
        push(f"http://127.0.0.1:{port}", "a", tmp_path, None, timeout=5)


def test_help_names_the_subcommands_and_the_defaults(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "drlora-train export --format peft" in out and "drlora-train import-peft" in out
    entries = {}  # flag -> its help text, joined over its lines
    for line in out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("    ") and entries:
            entries[flag] += " " + line.strip()
    for flag, default in (("--r-init", 8), ("--r-target", 16), ("--r-max", 32), ("--lr", "2e-05"),
                          ("--max-steps", 200), ("--batch-size", 8), ("--weight-decay", 0.0),
                          ("--eval-fraction", 0.1), ("--log-every", 10), ("--checkpoint-every", 0)):
        assert f"(default: {default})" in " ".join(entries[flag].split()), flag
    for cmd in ("export", "import-peft"):
        assert main([cmd, "--help"]) == 0
