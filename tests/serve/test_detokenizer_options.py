"""skip_special_tokens and spaces_between_special_tokens (vLLM's meanings): streamed (delta)
text equals the final text, on a WordPiece tokenizer (whose decoder puts spaces between
tokens) and on the tiny byte-level BPE model end to end."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drlora_serve.output_processor import OutputProcessor
from drlora_serve.protocol import StepOutputs
from drlora_serve.types import SamplingParams

from serve_helpers import PROMPTS, make_engine, run_all


@pytest.fixture(scope="module")
def wordpiece():
    vocab = {"[UNK]": 0, "[A]": 1, "[B]": 2, "hello": 3, "world": 4, "##s": 5, "[EOS]": 6}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens(["[A]", "[B]", "[EOS]"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]")


def run_processor(tok, ids: list[int], params: SamplingParams) -> tuple[str, str]:
    """(joined deltas, final text) for the same tokens."""
    texts = []
    for kind in ("delta", "final"):
        proc = OutputProcessor(tok, tok.eos_token_id)
        req = proc.add_request("r", [3], dataclasses.replace(params, output_kind=kind), None)
        pieces = []
        for i, t in enumerate(ids):
            done = [(req.key, "length")] if i == len(ids) - 1 else []
            proc.process(StepOutputs([req.key], [t], finished=done))
            out = proc.output(req)
            if out is not None:
                pieces.extend(o.text for o in out.outputs)
        texts.append("".join(pieces))
    return texts[0], texts[1]


@pytest.mark.parametrize("skip,spaces,expected", [
    (True, True, "hello worlds"),
    (False, True, "hello [A] [B] worlds [A]"),
    (False, False, "hello [A][B] worlds [A]"),
    (True, False, "hello worlds"),  # nothing kept: the option changes nothing
])
def test_special_tokens_options(wordpiece, skip, spaces, expected):
    ids = [3, 1, 2, 4, 5, 1]
    streamed, final = run_processor(wordpiece, ids, SamplingParams(skip_special_tokens=skip,
                                                                  spaces_between_special_tokens=spaces))
    assert final == expected and streamed == final


def test_special_tokens_kept_end_to_end(tiny_dir, tokenizer):
    eng = make_engine(tiny_dir, tokenizer)
    toks = tokenizer.encode(PROMPTS[0])
    sp = SamplingParams(max_tokens=8, temperature=0.7, seed=2, logit_bias={1: 4.0}, skip_special_tokens=False,
                        spaces_between_special_tokens=False, ignore_eos=True)
    eng.add_request("final", toks, dataclasses.replace(sp, output_kind="final"))
    eng.add_request("delta", toks, dataclasses.replace(sp, output_kind="delta"))
    eng.add_request("skip", toks, dataclasses.replace(sp, output_kind="final", skip_special_tokens=True))
    pieces, outs = [], {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == "delta":
                pieces.extend(o.text for o in out.outputs)
            if out.finished:
                outs[out.request_id] = out.outputs[0]
    final = outs["final"]
    specials = ("<|pad|>", "<|endoftext|>")  # (eos too: ignore_eos keeps it in the output)
    assert any(s in final.text for s in specials) and "".join(pieces) == final.text
    assert outs["skip"].token_ids == final.token_ids and not any(s in outs["skip"].text for s in specials)
    assert final.text.replace("<|pad|>", "").replace("<|endoftext|>", "") == outs["skip"].text
