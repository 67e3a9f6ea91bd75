"""Structured outputs (JSON schema, JSON object, regex, choice, Lark / GBNF grammar) with
llguidance: a request's constraint becomes an llguidance grammar; each of its sequences
advances a matcher with every token it accepts, and before each of its samples the matcher
fills that row's token bitmask (one bit per token), applied on the device (sampler.py).

Why llguidance (over xgrammar and outlines-core): the broadest JSON-schema coverage of the
three (it leads JSONSchemaBench; unsupported keywords are refused, not ignored), no ahead-of-
time token-mask precomputation (a schema compiles in about a millisecond, so compiling per
distinct schema at request time is cheap; xgrammar's compilation can take seconds for large
schemas), ~50 us per mask (Earley parser + lazy lexer over a token trie), a batch API that
fills many rows' masks in parallel threads without the GIL (`LLExecutor`), Lark *and* GBNF
grammars, an abi3 wheel with no Python dependencies (one wheel for every Python >= 3.10; xgrammar
brings torch, transformers, triton and apache-tvm-ffi pins of its own), maintained by the
guidance team and used by vLLM, SGLang and llama.cpp.

Where the work happens:
- the frontend (`GrammarValidator`) turns the request's constraint into grammar text and
  checks it (a bad schema, regex or grammar is a 400 before anything is sent), cached by text;
- the core (`GrammarEngine`) compiles each distinct grammar once (an LRU of compiled
  matchers keyed by the grammar text, which holds the compact schema / regex / grammar) in a
  worker thread, so a big schema never stalls the steps of other requests: the request waits
  outside the scheduler until its grammar is ready; each sequence gets a copy of the compiled
  matcher (a few microseconds);
- the matcher advances only with tokens the core accepted (`_process`), never with a row
  computed for a sequence that had already ended; the masks of step N+1 are filled once step
  N's tokens are in, while N+1's forward runs (core.py, "grammar masks"): in LLExecutor's
  threads for batches of PARALLEL_MIN_ROWS rows or more when the host has cores to spare, in
  the calling thread otherwise (the matchers' advances likewise). They are applied on the
  device by one kernel (kernels/token_bitmask.py); on the CPU, greedy batches mask a copy of
  the constrained rows alone (sampler.greedy_masked_cpu).

Legend: Nc constrained rows, W32 = ceil(V / 32) 32-bit words per mask, V vocab.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from drlora_serve.types import InvalidRequestError, StructuredOutputsParams

log = logging.getLogger(__name__)

JSON_OBJECT_SCHEMA = '{"type":"object"}'

# Handing a batch of masks (or of matcher advances) to LLExecutor's thread pool has a cost of
# its own (~15-25 us for two rows on the 2-core CI machine, where its one-thread pool lost to
# the calling thread at every batch of 1-64 rows, for vocabularies of 849 and 50k tokens):
# small batches, or a pool of one thread, work in the calling thread instead (each mask call
# drops the GIL there too). Whether 16 rows is the right bound on a many-core host is for the
# GPU host stage to show (benchmarks/grammar_fill.py).
PARALLEL_MIN_ROWS = 16
THREADS_ENV = "DRLORA_GRAMMAR_THREADS"


def mask_threads() -> int:
    """Threads for the batch's masks and advances: DRLORA_GRAMMAR_THREADS, else llguidance's own
    default (80% of the cores this process may run on, at most 32)."""
    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cores = os.cpu_count() or 1
    return max(1, min(32, cores * 4 // 5))


def _llg():
    import llguidance  # imported on first use: requests without a grammar never load it

    return llguidance


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar for a constraint (InvalidRequestError for input that is not even
    well formed: a schema that is not JSON, a grammar that cannot be read)."""
    llg = _llg()
    kind = so.kind()
    if kind in ("json", "json_object"):
        try:
            return _json_grammar(llg, so, kind)
        except RecursionError:  # (json's parser and printer stop at Python's recursion limit)
            raise InvalidRequestError("the JSON schema is nested too deeply") from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(so.regex)
    if kind == "choice":
        if not so.choice or not all(isinstance(c, str) for c in so.choice):
            raise InvalidRequestError("choice must be a non-empty list of strings")
        # one lexeme (a regex alternation of the literal strings) rather than llguidance's
        # "choice" grammar, whose rule has one alternative per string: its Earley rows hold at
        # most 2,000 items, and past that it fails mid-generation
        return llg.LLMatcher.grammar_from_regex("(" + "|".join(_regex_literal(c) for c in so.choice) + ")")
    try:
        return llg.grammar_from("grammar", so.grammar)
    except Exception as exc:  # noqa: BLE001 - the GBNF converter raises assorted errors
        raise InvalidRequestError(f"invalid grammar: {exc}") from None


def _json_grammar(llg, so: StructuredOutputsParams, kind: str) -> str:
    """The llguidance grammar of a JSON schema (json) or of any JSON object (json_object)."""
    if kind == "json_object":
        schema = JSON_OBJECT_SCHEMA
    elif isinstance(so.json, str):
        try:
            schema = json.dumps(json.loads(so.json), separators=(",", ":"))  # compact, order kept
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
    else:
        schema = json.dumps(so.json, separators=(",", ":"))
    if so.disable_additional_properties and kind == "json":
        schema = json.dumps(_closed(json.loads(schema)), separators=(",", ":"))
    if not schema.startswith("{") and schema not in ("true", "false"):
        raise InvalidRequestError("a JSON schema must be an object")
    try:
        return llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": not so.disable_any_whitespace})
    except ValueError as exc:
        raise InvalidRequestError(f"invalid JSON schema: {exc}") from None


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")


def _regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it (llguidance's Rust regex syntax)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _closed(schema):
    """additionalProperties: false on every object schema that does not set it (vLLM's
    disable_additional_properties)."""
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class _LRU:
    def __init__(self, size: int):
        self.size, self.d = size, OrderedDict()

    def get(self, key):
        v = self.d.get(key)
        if v is not None:
            self.d.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self.d[key] = value
        if len(self.d) > self.size:
            self.d.popitem(last=False)


class GrammarValidator:
    """Frontend side: a constraint -> checked grammar text (InvalidRequestError with the
    parser's message otherwise). Cached by the grammar text."""

    def __init__(self, cache_size: int = 512):
        self._cache = _LRU(cache_size)

    def check(self, so: StructuredOutputsParams) -> str:
        text = grammar_text(so)
        err = self._cache.get(text)
        if err is None:
            llg = _llg()
            is_err, msgs = llg.LLMatcher.validate_grammar_with_warnings(text)
            err = msgs[0] if is_err else ("no text can satisfy it" if _matches_nothing(llg, text) else "")
            self._cache.put(text, err)
        if err:
            raise InvalidRequestError(f"invalid {so.kind().replace('_', ' ')} constraint: {_short(err)}")
        return text


@functools.cache
def _bytes_tokenizer():
    llg = _llg()
    return llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()))


def _matches_nothing(llg, text: str) -> bool:
    """Whether no text at all satisfies a (valid) grammar: a regex like `[^\\s\\S]`, a rule that
    only recurses, a cycle of `$ref`s. Asked of a matcher over the 256 bytes (a ~1 ms compile,
    independent of the model's tokenizer): its first mask finds nothing to allow and leaves it
    in its error state. (Served as is, such a grammar would allow only the end, at once.)"""
    m = llg.LLMatcher(_bytes_tokenizer(), text, log_level=0)
    if m.is_error():  # (a grammar naming the model's special tokens, say): not for this check
        return False
    m.compute_bitmask()
    return m.is_error() and m.get_error().startswith("NoExtensionBias")  # (llguidance's "nothing can follow")


class _Bytes:
    """A tokenizer of one token per byte and an end token, for _matches_nothing."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"</s>"]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def _short(msg: str, limit: int = 500) -> str:
    msg = msg.split("\n<state>")[0].strip()
    return msg if len(msg) <= limit else msg[:limit] + "..."


class GrammarEngine:
    """Core side: compiled grammars (LRU, compiled in a worker thread), per-sequence matchers,
    and the batch's bitmasks."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, max_rows: int, pin: bool,
                 cache_size: int = 256):
        from drlora_serve.sequence import SeqStatus  # (torch: not at this module's import)

        self._finished = SeqStatus.FINISHED
        self.load_tokenizer = load_tokenizer  # the HF tokenizer (loaded in the worker, on first use)
        self.vocab_size = vocab_size
        self._max_rows, self._pin = max_rows, pin
        self._llt = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="drlora-grammar")
        self._cache = _LRU(cache_size)  # grammar text -> Future[compiled LLMatcher]
        self.threads = mask_threads()
        self._executor = None  # LLExecutor, made on first use when threads > 1
        self._masks = None  # two (max_rows, W32) host mask buffers, made with the grammar tokenizer
        self._turn = 0

    # ------------------------------------------------------------------ compile
    def compile(self, so: StructuredOutputsParams) -> Future:
        """A future of the compiled matcher for the constraint (copied per sequence)."""
        try:
            text = grammar_text(so)
        except InvalidRequestError as exc:
            fut = Future()
            fut.set_exception(exc)
            return fut
        fut = self._cache.get(text)
        if fut is None or (fut.done() and fut.exception() is not None and not isinstance(
                fut.exception(), InvalidRequestError)):
            fut = self._pool.submit(self._compile, text, so.kind())
            self._cache.put(text, fut)
        return fut

    def _compile(self, text: str, kind: str):
        llg = _llg()
        if self._llt is None:
            import llguidance.hf
            import torch

            tok = self.load_tokenizer()
            n = max(self.vocab_size, len(tok))
            llt = llguidance.hf.from_tokenizer(tok, n_vocab=n)
            # llguidance fills masks of exactly its tokenizer's vocabulary, which can exceed the
            # model's (added tokens the embeddings lack): the words past the logits are ignored.
            # Made before any matcher exists, so before any fill. Two buffers, used alternately:
            # one may still be copied to the device.
            self._masks = [torch.full((self._max_rows, -(-n // 32)), -1, dtype=torch.int32, pin_memory=self._pin)
                           for _ in range(2)]
            self._llt = llt
        m = llg.LLMatcher(self._llt, text, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"invalid {kind.replace('_', ' ')} constraint: {_short(m.get_error())}")
        return m

    @staticmethod
    def matcher(compiled) -> object:
        """A fresh matcher for one sequence."""
        return compiled.deep_copy()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def failure(seq) -> InvalidRequestError:
        """Why a sequence's grammar cannot go on, as the error its request fails with: its matcher
        refused the sampled token (no token it allows was left to sample: allowed_token_ids or
        bad_words exclude them all), or failed while generating (a parser limit, say) and
        allowed nothing but the end."""
        p = seq.request.params
        err = _short(seq.grammar.get_error()) or "the token was refused"
        msg = f"the {p.structured_outputs.kind().replace('_', ' ')} constraint could not be followed: {err}"
        if p.allowed_token_ids is not None or p.bad_words_token_ids:
            msg += " (allowed_token_ids or bad_words may exclude every token it allows)"
        return InvalidRequestError(msg)

    # ------------------------------------------------------------------ per step
    def advance(self, constrained: list[tuple[int, object]], tokens: list[int]) -> list[object]:
        """Advance the matchers of the step's constrained rows [(row, sequence)] that are still
        running with their rows' tokens; the sequences whose grammar refused its token (the
        matcher is then in its error state). In LLExecutor's threads under the same rule as the
        masks (an advance costs about what a mask does on a 50k-token vocabulary, ~8 us; ~1 us
        on the tiny model's), row by row in this thread otherwise."""
        finished = self._finished
        if self._in_pool(len(constrained)):
            going = [(s, tokens[i]) for i, s in constrained if s.status is not finished]
            if not going:
                return []
            ok = self._pool_executor().consume_token_par([(s.grammar, t) for s, t in going])  # (not for none)
            return [s for (s, _), good in zip(going, ok) if not good]
        refused = []
        for i, s in constrained:
            if s.status is not finished and not s.grammar.consume_token(tokens[i]):
                refused.append(s)
        return refused

    def _in_pool(self, rows: int) -> bool:
        """Whether a step's masks or advances for `rows` constrained rows go to LLExecutor's
        threads (the one rule for both; PARALLEL_MIN_ROWS says why)."""
        return self.threads > 1 and rows >= PARALLEL_MIN_ROWS

    def _pool_executor(self):
        if self._executor is None:
            self._executor = _llg().LLExecutor(self.threads)
        return self._executor

    def fill(self, constrained: list[tuple[int, object]], want_ended: bool = False) -> tuple[object, set[int]]:
        """Masks for the constrained rows [(row, sequence)] of a step, from their matchers'
        current states: ((Nc, W32) int32 host bitmask, rows whose grammar allows only its end,
        when want_ended). A sequence that has ended meanwhile gets an all-allowed row (its
        token is dropped)."""
        self._turn ^= 1
        n = len(constrained)
        mask = self._masks[self._turn][:n]
        ptr, row_bytes = mask.data_ptr(), mask.shape[1] * 4
        parallel = self._in_pool(n)
        jobs, finished = [], self._finished
        for j, (_, s) in enumerate(constrained):
            if s.status is finished:  # anything goes: its token is dropped
                mask[j].fill_(-1)
            elif parallel:
                jobs.append((s.grammar, j))
            else:
                s.grammar.unsafe_compute_mask_ptr(ptr + j * row_bytes, row_bytes)
        if jobs:  # every matcher's mask, in the executor's threads, without the GIL
            self._pool_executor().unsafe_compute_mask_ptr(jobs, ptr, row_bytes, n)
        ended = {i for i, s in constrained if not s.is_finished and s.grammar.is_stopped()} if want_ended else set()
        return mask, ended
