"""LLMEngine: the engine core and the output processor in one process (the offline LLM, tests,
benchmarks). `step()` = the core's step (schedule, run, postprocess) + the frontend's
processing of its deltas (text, stop strings) -> RequestOutputs. A request that fails while it
runs (a grammar that cannot go on) gets a final RequestOutput with `error` set; the others go on.

The HTTP server runs the same two halves in two processes instead (async_llm.py + core_proc.py).
Not thread safe.
"""

from __future__ import annotations

from pathlib import Path

from drlora.models import resolve_model

from drlora_serve.config import EngineArgs
from drlora_serve.core import EngineCore
from drlora_serve.model_runner import ModelRunner
from drlora_serve.output_processor import OutputProcessor
from drlora_serve.preprocess import prepare
from drlora_serve.structured import GrammarValidator
from drlora_serve.types import AdapterInfo, EngineStats, InvalidRequestError, RequestOutput, SamplingParams


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class LLMEngine:
    def __init__(self, args: EngineArgs, model_dir: Path | None = None, runner: ModelRunner | None = None,
                 tokenizer=None):
        self.args = args
        self.model_dir = Path(model_dir) if model_dir is not None else resolve_model(
            args.model, dummy=args.load_format == "dummy")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        eos = self.tokenizer.eos_token_id
        self.core = EngineCore(args, self.model_dir, runner, eos_token_id=eos, tokenizer=self.tokenizer)
        self.processor = OutputProcessor(self.tokenizer, eos)
        self.grammars = GrammarValidator()
        self.model_name = self.core.model_name
        self.max_model_len = self.core.max_model_len
        self.eos_token_id = eos

    # the core's parts, for tests and benchmarks
    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def blocks(self):
        return self.core.blocks

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def pool(self):
        return self.core.pool

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        if request_id in self.processor.requests:
            raise InvalidRequestError(f"request id '{request_id}' is already in use")
        params, ids = prepare(params, list(prompt_token_ids), self.tokenizer, self.core.vocab_size,
                              self.max_model_len, self.grammars)
        req = self.processor.add_request(request_id, ids, params, adapter)
        try:
            self.core.add_request(request_id, req.key, req.prompt_token_ids, params, adapter)
        except BaseException:
            self.processor.remove(request_id)
            raise

    def abort(self, request_id: str) -> RequestOutput | None:
        self.core.abort(request_id)
        req = self.processor.abort(request_id)
        return self.processor.output(req, "final") if req is not None and req.error is None else None

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished() or self.processor.has_unfinished()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        touched, stopped = self.processor.process(self.core.step())
        if stopped:
            self.core.finish_seqs(stopped)
        outs = []
        for req in touched:
            if req.error is not None:  # failed while running: its final output says why
                outs.append(self.processor.failed_output(req))
            elif (req.finished or req.params.output_kind != "final") and (o := self.processor.output(req)) is not None:
                outs.append(o)
        return outs

    # ------------------------------------------------------------------ adapters & stats
    def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        return self.core.load_adapter(name, path, replace)

    def unload_adapter(self, name: str) -> None:
        self.core.unload_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.core.list_adapters()

    def compact_adapters(self) -> int:
        return self.core.compact_adapters()

    def stats(self) -> EngineStats:
        return self.core.stats()
