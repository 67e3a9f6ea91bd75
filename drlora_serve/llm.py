"""Offline Python API.

    llm = LLM(model="tiny", adapters="./adapters", max_loras=8)
    outs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=16), adapter=["a", None])
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from drlora_serve.config import EngineArgs
from drlora_serve.engine import LLMEngine
from drlora_serve.preprocess import chat_prompt_ids
from drlora_serve.types import AdapterInfo, RequestOutput, SamplingParams


Prompt = str | list[int] | dict  # text, token ids, or {"prompt": text} / {"prompt_token_ids": ids} (vLLM)


class LLM:
    def __init__(self, model: str = "tiny", adapters: str | Path | dict[str, str] | None = None, **engine_args):
        if isinstance(adapters, dict):
            engine_args["lora_modules"] = {**engine_args.get("lora_modules", {}), **{k: str(v) for k, v in adapters.items()}}
        elif adapters is not None:
            engine_args["adapters_dir"] = str(adapters)
        self._attach(LLMEngine(EngineArgs(model=model, **engine_args)))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """An LLM around an engine built elsewhere (a custom runner, tests, benchmarks)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | None | list[str | None] = None) -> list[RequestOutput]:
        """Run every prompt to completion (continuous batching); outputs in prompt order.
        A prompt is text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}.
        Only final outputs are made (no per-step snapshots; text decoded once per sequence
        unless stop strings need it sooner). A request that fails while running raises its
        error (the others are aborted)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * n
        params = [dataclasses.replace(p, output_kind="final") for p in params]
        adapters = adapter if isinstance(adapter, list) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise ValueError("sampling_params and adapter lists must have one entry per prompt")
        ids = []
        try:
            for p, sp, a in zip(prompts, params, adapters):
                toks = self._prompt_ids(p)
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, toks, sp, a)
                ids.append(rid)
            done: dict[str, RequestOutput] = {}
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        done[out.request_id] = out
            return [done[r] for r in ids]
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             adapter: str | None | list[str | None] = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or several, rendered with the
        model's chat template (as the server's /v1/chat/completions does), then generate()."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate()")
        ids = [chat_prompt_ids(self.tokenizer, c, add_generation_prompt, tools) for c in convs]
        return self.generate(ids, sampling_params, adapter)

    def _prompt_ids(self, p: Prompt) -> list[int]:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                return list(p["prompt_token_ids"])
            if "prompt" in p:
                return self.tokenizer.encode(p["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
        return self.tokenizer.encode(p) if isinstance(p, str) else list(p)

    def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> AdapterInfo:
        return self.engine.load_adapter(name, str(path), replace)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()
