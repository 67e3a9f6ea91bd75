import json

import pytest
from transformers import AutoTokenizer

from drlora_train.data import IGNORE, DataError, encode, load_data, read_jsonl, split


@pytest.fixture(scope="module")
def tok(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_prompt_completion_masks_prompt(tok):
    ex = encode({"prompt": "12 + 3 =", "completion": " 15"}, tok, 512)
    n_prompt = len(tok("12 + 3 =", add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:-1]) == " 15"
    assert ex.prompt == "12 + 3 =" and ex.reference == " 15"


def test_messages_loss_on_assistant_only(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    ex = encode({"messages": msgs}, tok, 512)
    trained = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert trained == "hello there<|endoftext|>bye<|endoftext|>"
    assert ex.reference == "bye" and ex.prompt.endswith("<|assistant|>")


def test_text_trains_everything(tok):
    ex = encode({"text": "the river runs"}, tok, 512)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_truncation(tok):
    ex = encode({"text": "a b c d e f g h i j"}, tok, 4)
    assert len(ex.input_ids) == len(ex.labels) == 4


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "not valid JSON"),
    ({"prompt": "x"}, "'prompt' and 'completion' must both be strings"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"foo": 1}, "expected keys"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_line_reported_with_line_number(tmp_path, bad, msg):
    p = _write(tmp_path / "d.jsonl", [{"text": "ok"}, "", {"text": "fine"}, bad])
    with pytest.raises(DataError) as err:
        read_jsonl(p)
    s = str(err.value)
    assert s.startswith(f"{p}:4: ") and msg in s and "\n" not in s


def test_split_and_eval_file(tmp_path, tok):
    recs = [{"text": f"line {i}"} for i in range(20)]
    tr, ev = split(recs, 0.25, seed=0)
    assert len(ev) == 5 and len(tr) == 15 and not set(map(str, tr)) & set(map(str, ev))
    assert split(recs, 0.25, seed=0) == (tr, ev)
    train_p = _write(tmp_path / "t.jsonl", recs)
    eval_p = _write(tmp_path / "e.jsonl", [{"prompt": "1 + 1 =", "completion": " 2"}])
    tr, ev = load_data(str(train_p), tok, 64, 0.5, 0, eval_path=str(eval_p))
    assert len(tr) == 20 and len(ev) == 1


def test_non_utf8_line_reported_with_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 13\)"):
        read_jsonl(p)


def test_eval_without_scorable_tokens_and_with_empty_prompts(tiny_path, tok):
    """No labelled token: eval_loss is None (not 0.0). An empty prompt: no crash, and no
    exact-match score for it (nothing to generate from)."""
    from drlora_train.evaluate import EvalConfig, evaluate, greedy_completions
    from tests.train.conftest import load_tiny

    model = load_tiny(tiny_path)
    cut = encode({"prompt": "12 + 3 = 1 2 3 4 5 6", "completion": " 15"}, tok, 3)  # completion truncated away
    res = evaluate(model, tok, [cut], EvalConfig(max_new_tokens=2), "cpu")
    assert res["eval_loss"] is None and res["eval_tokens"] == 0 and res["exact_match_examples"] == 1
    empty = encode({"prompt": "", "completion": "hello there"}, tok, 512)
    res = evaluate(model, tok, [empty], EvalConfig(max_new_tokens=2), "cpu")
    assert res["eval_loss"] > 0 and res["eval_tokens"] > 0 and "exact_match" not in res
    res = evaluate(model, tok, [empty, cut], EvalConfig(max_new_tokens=2), "cpu")
    assert res["eval_tokens"] > 0 and res["exact_match_examples"] == 1
    outs = greedy_completions(model, tok, ["", "1 + 1 =", ""], 2, 2, "cpu")
    assert outs[0] == outs[2] == "" and len(outs) == 3
