"""`drlora-serve`: parse vLLM-style flags onto EngineArgs + ServerConfig and run uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from drlora.cli_help import DefaultsHelpFormatter
from drlora_serve.config import EngineArgs

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def lora_module(text: str) -> tuple[str, str]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}`."""
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
            name, path = d["name"], d["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"bad --lora-modules JSON {text!r} (need name and path)")
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"bad --lora-modules entry {text!r} (expected name=path)")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"bad --lora-modules entry {text!r} (empty name or path)")
    return str(name), str(path)


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}")
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def _structured_config(text: str) -> dict:
    try:
        cfg = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(cfg, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    known = {"disable_any_whitespace", "disable_additional_properties", "backend"}
    if set(cfg) - known:
        raise argparse.ArgumentTypeError(f"unknown keys {sorted(set(cfg) - known)} (known: {sorted(known)})")
    if cfg.get("backend", "auto") not in ("auto", "guidance"):
        raise argparse.ArgumentTypeError("backend: only 'auto' or 'guidance' (llguidance) is offered")
    cfg.pop("backend", None)
    if not all(isinstance(v, bool) for v in cfg.values()):
        raise argparse.ArgumentTypeError("disable_* values must be true or false")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="drlora-serve", description="OpenAI-compatible server for MoE LoRA adapters "
                "with per-expert ranks (vLLM's multi-LoRA API).", formatter_class=DefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="tiny", help="tiny, tiny-qwen3-moe, tiny-qwen2-moe, tiny-mixtral, an alias (olmoe, "
      "olmoe-instruct, qwen3-moe, qwen2-moe, mixtral), a folder or a hub id")
    a("--served-model-name", default=None, help="name of the base model in the API (default: --model)")
    a("--adapters", default=None, help="folder whose subfolders are adapters; watched for changes")
    a("--lora-modules", nargs="+", type=lora_module, default=[], metavar="NAME=PATH",
      help='adapters to load at start: name=path or \'{"name": .., "path": ..}\'')
    a("--lora-root", action="append", default=[], help="allowed root for load_lora_adapter paths "
      "(repeatable; default: --adapters plus the parents of --lora-modules)")
    a("--watch-interval", type=_positive(float), default=2.0, help="seconds between adapter folder polls")
    a("--host", default="127.0.0.1", help="bind address (0.0.0.0 to listen on all interfaces)")
    a("--port", type=int, default=8000, help="TCP port")
    a("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
      "(default: $DRLORA_API_KEY or $VLLM_API_KEY)")
    a("--max-loras", type=_positive(int), default=EngineArgs.max_loras,
      help="adapters resident on the device at once (one batch may mix them all)")
    a("--max-cpu-loras", type=_positive(int), default=EngineArgs.max_cpu_loras,
      help="adapters kept in host memory (an LRU; the others are read from disk when asked for)")
    a("--max-lora-rank", type=_positive(int), default=EngineArgs.max_lora_rank,
      help="largest rank of one expert or projection an adapter may have")
    a("--lora-pool-rank-rows", type=_positive(int), default=None,
      help="rank rows per (layer, projection) in the device pool of packed adapters "
      "(default: max-loras x experts x 16)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="auto: bfloat16 on CUDA, float32 on CPU")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--gpu-memory-utilization", type=_positive(float), default=EngineArgs.gpu_memory_utilization,
      help="fraction of the GPU's memory for weights, adapter pool and KV cache")
    a("--max-model-len", type=_positive(int), default=None,
      help="longest prompt plus output (default: the model's max_position_embeddings)")
    a("--max-num-seqs", type=_positive(int), default=EngineArgs.max_num_seqs, help="sequences in one batch")
    a("--max-num-batched-tokens", type=_positive(int), default=EngineArgs.max_num_batched_tokens,
      help="tokens in one step (longer prompts are prefilled in chunks)")
    a("--block-size", type=_positive(int), default=EngineArgs.block_size, help="tokens per KV cache block")
    a("--num-kv-blocks", type=_positive(int), default=None,
      help="KV cache blocks (default: sized from --gpu-memory-utilization on CUDA, 1024 on CPU)")
    a("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
      help="turn off automatic prefix caching (on by default)")
    a("--seed", type=int, default=EngineArgs.seed, help="seed of the sampler for requests without one, and of --load-format dummy weights")
    a("--enforce-eager", action="store_true", help="no CUDA graphs")
    a("--cuda-graph-sizes", type=_positive(int), nargs="+", default=None,
      help="decode batch sizes captured as CUDA graphs at start-up (default: 1 2 4 8 16 24 32 48 64 96 "
      "128 192 256 up to --max-num-seqs, and --max-num-seqs)")
    a("--strict-cuda-graphs", action="store_true",
      help="a CUDA graph capture failure stops the engine (default: an error is logged, the "
      "drlora:cuda_graphs_enabled gauge drops to 0 and decode runs eagerly); also DRLORA_STRICT_CUDA_GRAPHS=1")
    a("--load-format", default="auto", choices=["auto", "dummy"],
      help="dummy: random weights of the config's shape, no checkpoint needed (benchmarks)")
    a("--cpu-threads", type=_positive(int), default=None,
      help="torch threads of the engine core on CPU (default: every core but one)")
    a("--model-class", default=None, metavar="MODULE:CLASS",
      help="serving model class to use instead of the one registered for the config's model_type "
      "(out-of-tree models; benchmarks/host_overhead.py's stub model)")
    a("--no-async-scheduling", dest="async_scheduling", action="store_false",
      help="wait for each step's tokens before scheduling the next (no overlap of host and device)")
    a("--enable-lora", action="store_true", help="accepted for vLLM compatibility (always on)")
    a("--structured-outputs-config", type=_structured_config, default={}, metavar="JSON",
      help='defaults of structured outputs (vLLM\'s flag): {"disable_any_whitespace": true} for compact '
      'JSON, {"disable_additional_properties": true}; "backend" may only be "auto" or "guidance" (llguidance)')
    g = p.add_mutually_exclusive_group()
    g.add_argument("--allow-runtime-lora-updating", dest="runtime_updates", action="store_true",
                   default=None, help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter "
                   "(the default, unless $DRLORA_ALLOW_RUNTIME_LORA_UPDATING or $VLLM_ALLOW_RUNTIME_LORA_UPDATING is false)")
    g.add_argument("--disable-runtime-lora-updating", dest="runtime_updates", action="store_false",
                   help="answer 403 on the load/unload endpoints")
    a("--shutdown-timeout", type=_positive(float), default=30.0,
      help="seconds to let in-flight requests finish on shutdown before aborting them")
    a("--max-prompts-per-request", type=_positive(int), default=2048,
      help="most prompts x n one completion request may carry (a 400 beyond)")
    a("--max-request-mb", type=float, default=64.0,
      help="largest request body in MiB (a 413 beyond; 0: no limit)")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="logging level")
    for flag in ("--allowed-origins", "--allowed-methods", "--allowed-headers"):
        a(flag, type=_string_list, default=["*"], metavar="JSON", help="CORS, as vLLM: a JSON list (default [\"*\"])")
    a("--allow-credentials", action="store_true", help="CORS: allow credentials")
    a("--chat-template", default=None, metavar="FILE|TEMPLATE",
      help="Jinja chat template for chat requests, a file or the template itself (default: the tokenizer's)")
    a("--trust-request-chat-template", action="store_true",
      help="render a chat request's own chat_template (a 400 otherwise; the model's template is used)")
    a("--enable-prompt-tokens-details", action="store_true",
      help="usage carries prompt_tokens_details.cached_tokens (prompt tokens served by the prefix cache)")
    # vLLM flags that change nothing here, accepted so that a vLLM command line runs as it is
    a("--trust-remote-code", action="store_true", help="accepted for vLLM compatibility (no checkpoint code is run)")
    a("--disable-log-requests", "--enable-log-requests", dest="log_requests", action="store_true",
      help="accepted for vLLM compatibility (--log-level debug logs every request line)")
    a("--disable-log-stats", action="store_true", help="accepted for vLLM compatibility (stats are in /metrics)")
    return p


def _string_list(text: str) -> list[str]:
    try:
        v = json.loads(text)
    except ValueError:
        v = None
    if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return v


def _env_flag(*names: str) -> bool | None:
    for n in names:
        v = os.environ.get(n, "").strip().lower()
        if v in TRUE:
            return True
        if v in FALSE:
            return False
    return None


def configure(argv: list[str] | None = None):
    """Parse and check flags -> (EngineArgs, ServerConfig); exits 2 with a one-line error."""
    # heavy imports (torch via the adapter format) only after the flags parsed
    parser = build_parser()
    args = parser.parse_args(argv)
    return _configure(parser, args)


def _configure(parser, args):
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.gpu_memory_utilization > 1:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    from drlora.models import ModelNotFoundError, resolve_model

    try:
        model_path = str(resolve_model(args.model, dummy=args.load_format == "dummy"))
    except ModelNotFoundError as exc:
        parser.error(f"--model: {exc}")
    adapters = None
    if args.adapters:
        ad = Path(args.adapters).expanduser()
        if ad.exists() and not ad.is_dir():
            parser.error(f"--adapters: {ad} is not a folder")
        if not ad.exists():  # said out loud: a typo would otherwise serve no adapters quietly
            print(f"drlora-serve: note: --adapters {ad} did not exist; created it (empty, watched)", file=sys.stderr)
        ad.mkdir(parents=True, exist_ok=True)
        adapters = str(ad.resolve())
    chat_template = _chat_template(parser, args.chat_template) if args.chat_template is not None else None
    modules: dict[str, str] = {}
    for name, path in args.lora_modules:
        if not Path(path).expanduser().is_dir():
            parser.error(f"--lora-modules: {name}: {path} is not a folder")
        modules[name] = str(Path(path).expanduser().resolve())
    roots = [str(Path(r).expanduser().resolve()) for r in args.lora_root]
    if not roots:
        roots = ([adapters] if adapters else []) + sorted({str(Path(p).parent) for p in modules.values()})
    runtime = args.runtime_updates
    if runtime is None:
        env = _env_flag("DRLORA_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        runtime = True if env is None else env
    engine_args = EngineArgs(
        model=args.model, served_model_name=args.served_model_name, adapters_dir=None,
        lora_modules=modules, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank, lora_pool_rank_rows=args.lora_pool_rank_rows,
        dtype=args.dtype, device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        cuda_graph_sizes=args.cuda_graph_sizes, strict_cuda_graphs=args.strict_cuda_graphs,
        seed=args.seed, load_format=args.load_format, model_class=args.model_class,
        async_scheduling=args.async_scheduling, cpu_threads=args.cpu_threads)
    from server.state import ServerConfig

    config = ServerConfig(
        host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("DRLORA_API_KEY") or os.environ.get("VLLM_API_KEY") or None,
        base_aliases=[args.model, model_path], model_path=model_path, adapters_dir=adapters,
        watch_interval=args.watch_interval, lora_roots=roots, allow_runtime_lora_updating=runtime,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_prompts_per_request=args.max_prompts_per_request,
        structured_defaults=args.structured_outputs_config, allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials, trust_request_chat_template=args.trust_request_chat_template,
        chat_template=chat_template, enable_prompt_tokens_details=args.enable_prompt_tokens_details)
    return engine_args, config


def _chat_template(parser, value: str) -> str:
    """vLLM's --chat-template: a file's text, or the template itself (anything with Jinja tags)."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--chat-template: {path} could not be read ({exc})")
    if "{{" in value or "{%" in value:
        return value
    parser.error(f"--chat-template: {value} is neither a file nor a template")


def main(argv: list[str] | None = None, engine_factory=None) -> None:
    """`engine_factory(engine_args)` replaces the real engine (tests use a fake one)."""
    engine_args, config = configure(argv)
    level = config.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.app import build_app
    from server.state import Lifecycle

    def make_engine():
        if engine_factory is not None:
            return engine_factory(engine_args)
        from drlora_serve.async_llm import AsyncLLM

        return AsyncLLM.from_args(engine_args, log_level=level)

    # the port first (a port in use is a one-line error before minutes of model loading); the
    # engine then starts behind it (Lifecycle), /health answering 503 meanwhile
    sock = bind_socket(config.host, config.port)
    status = 0

    def exit_with(code: int) -> None:
        nonlocal status
        status = status or code
        server.should_exit = True

    app = build_app(make_engine, config, Lifecycle(exit=exit_with, stopping=lambda: server.should_exit))
    # uvicorn's own deadline only backs up the app's, which fails late requests with an error body
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=level,
                                           access_log=level == "debug",
                                           timeout_graceful_shutdown=config.shutdown_timeout + 5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained for (uvicorn.run() hides it too)
        pass
    if status:
        raise SystemExit(status)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (SO_REUSEADDR, as uvicorn's); exits 2 with one line when it
    cannot be (a port in use, an unknown host)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        print(f"drlora-serve: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
