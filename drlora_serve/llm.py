"""Offline Python API, called as vLLM's `LLM` is.

    llm = LLM(model="tiny", enable_lora=True, adapters="./adapters", max_loras=8)
    outs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=16),
                        lora_request=[LoRARequest("a", 1, "./adapters/a"), None])
    outs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=16), adapter=["a", None])  # by name
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from collections.abc import Callable
from pathlib import Path

from drlora_serve.config import EngineArgs
from drlora_serve.engine import LLMEngine
from drlora_serve.preprocess import chat_prompt
from drlora_serve.types import (AdapterInfo, AdapterNotFoundError, LoRARequest, RequestOutput,
                                SamplingParams)


Prompt = str | list[int] | dict  # text, token ids, or {"prompt": text} / {"prompt_token_ids": ids} (vLLM)
LoRA = LoRARequest | str | None  # a LoRARequest (vLLM), or a registered adapter's name

# vLLM constructor arguments that change nothing here (the CLI accepts their flags alike)
NOOP_ARGS = frozenset({"enable_lora", "trust_remote_code", "disable_log_stats", "disable_log_requests",
                       "enable_log_requests"})
# vLLM constructor arguments accepted with their one value that this engine runs (one device)
ONLY_VALUE_ARGS = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}


class LLM:
    def __init__(self, model: str = "tiny", adapters: str | Path | dict[str, str] | None = None, **engine_args):
        """`model`: a name or folder (drlora.models.resolve_model); `adapters`: a folder whose
        subfolders are adapters, or {name: path}; the rest are EngineArgs fields (vLLM's names).
        enable_lora, trust_remote_code, disable_log_stats are accepted and change nothing (LoRA
        is always on); tensor_parallel_size / pipeline_parallel_size only as 1; seed=None draws
        a random seed (vLLM's meaning: none fixed)."""
        for name in NOOP_ARGS & engine_args.keys():
            del engine_args[name]
        for name, only in ONLY_VALUE_ARGS.items():
            if name in engine_args and engine_args.pop(name) != only:
                raise ValueError(f"{name} must be {only}: this engine runs on one device")
        if "seed" in engine_args and engine_args["seed"] is None:  # vLLM: no fixed seed
            engine_args["seed"] = secrets.randbits(63)
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(engine_args.keys() - known)
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword arguments {', '.join(unknown)} (not engine arguments "
                            "here; see drlora_serve.config.EngineArgs)")
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

    @property
    def llm_engine(self) -> LLMEngine:  # vLLM's name
        return self.engine

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | None | list[str | None] = None, *, lora_request: LoRA | list[LoRA] = None,
                 use_tqdm: bool | Callable = False) -> list[RequestOutput]:
        """Run every prompt to completion (continuous batching); outputs in prompt order.
        A prompt is text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}.
        The adapter: `lora_request` (vLLM's LoRARequest, or a name; one, or one per prompt) or
        `adapter` (names), not both. `use_tqdm`: a progress bar (or a callable making it, as
        vLLM; off by default here). Only final outputs are made (no per-step snapshots; text
        decoded once per sequence unless stop strings need it sooner). A request that fails
        while running raises its error (the others are aborted)."""
        return self._run([self._prompt(p) for p in self._as_list(prompts)], sampling_params, adapter, lora_request,
                         use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             adapter: str | None | list[str | None] = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, *, lora_request: LoRA | list[LoRA] = None,
             use_tqdm: bool | Callable = False, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, continue_final_message: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or several, rendered with the
        model's chat template (or `chat_template`; `chat_template_kwargs` are its extra variables;
        `continue_final_message` leaves the last message open instead of adding a generation
        prompt, as vLLM), then generated as generate() does."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        # (bad options and a model without a template: InvalidRequestError, a ValueError)
        prompts = [chat_prompt(self.tokenizer, conv, add_generation_prompt, tools, chat_template=chat_template,
                               template_kwargs=chat_template_kwargs, continue_final_message=continue_final_message,
                               instead="use generate() or give chat_template")
                   for conv in convs]
        return self._run(prompts, sampling_params, adapter, lora_request, use_tqdm)

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def _run(self, prompts: list[tuple[str | None, list[int]]], sampling_params, adapter, lora_request,
             use_tqdm) -> list[RequestOutput]:
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * n
        params = [dataclasses.replace(p, output_kind="final") for p in params]
        if adapter is not None and lora_request is not None:
            raise ValueError("give one of adapter and lora_request")
        loras = adapter if adapter is not None else lora_request
        loras = loras if isinstance(loras, list) else [loras] * n
        if len(params) != n or len(loras) != n:
            raise ValueError("sampling_params and lora_request (adapter) lists must have one entry per prompt")
        names = self._adapter_names(loras)
        ids = []
        bar = self._progress(use_tqdm, n)
        try:
            for (_, toks), sp, name in zip(prompts, params, names):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, toks, sp, name)
                ids.append(rid)
            done: dict[str, RequestOutput] = {}
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            outs = [done[r] for r in ids]
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        for out, (text, _), lora in zip(outs, prompts, loras):
            out.prompt = text
            if isinstance(lora, LoRARequest):
                out.lora_request = lora
                for o in out.outputs:
                    o.lora_request = lora
        return outs

    def _adapter_names(self, loras: list[LoRA]) -> list[str | None]:
        """The registered adapter each entry names; a LoRARequest's adapter is loaded from its
        lora_path the first time its name is seen (or again with load_inplace)."""
        seen: dict[str, str] = {}
        names = []
        for lora in loras:
            if not isinstance(lora, LoRARequest):
                names.append(lora)
                continue
            if lora.lora_name not in seen:
                seen[lora.lora_name] = lora.lora_path
                self._register(lora)
            elif seen[lora.lora_name] != lora.lora_path:
                raise ValueError(f"LoRARequests name adapter '{lora.lora_name}' with two paths "
                                 f"({seen[lora.lora_name]!r}, {lora.lora_path!r})")
            names.append(lora.lora_name)
        return names

    def _register(self, lora: LoRARequest) -> None:
        have = {a.name: a for a in self.engine.list_adapters()}.get(lora.lora_name)
        path = str(Path(lora.lora_path).expanduser().resolve()) if lora.lora_path else None
        if have is not None and (path is None or (path == have.path and not lora.load_inplace)):
            return
        if have is not None and not lora.load_inplace:
            raise ValueError(f"adapter '{lora.lora_name}' is loaded from {have.path}, not {path}: unload it first, "
                             "use another name, or set load_inplace=True to replace it")
        if path is None:
            raise AdapterNotFoundError(f"adapter '{lora.lora_name}' is not loaded and the LoRARequest has no lora_path")
        self.engine.load_adapter(lora.lora_name, path, replace=have is not None)

    @staticmethod
    def _progress(use_tqdm: bool | Callable, total: int):
        if not use_tqdm:
            return None
        if callable(use_tqdm):
            make = use_tqdm
        else:
            try:
                from tqdm import tqdm as make
            except ImportError:
                return None
        return make(total=total, desc="Processed prompts", dynamic_ncols=True)

    def _prompt(self, p: Prompt) -> tuple[str | None, list[int]]:
        """(its text if given as text, its token ids)."""
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                return p.get("prompt"), list(p["prompt_token_ids"])
            if "prompt" in p:
                return p["prompt"], self.tokenizer.encode(p["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
        return (p, self.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p))

    def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> AdapterInfo:
        return self.engine.load_adapter(name, str(path), replace)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()
