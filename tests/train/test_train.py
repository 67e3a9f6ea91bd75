import re
import shutil

import torch

from drlora.adapter_format import read_adapter
from drlora_train.config import TrainConfig
from drlora_train.run import train
from tests.train.conftest import FAVOURITES

SMALL = dict(r_init=2, r_target=4, r_max=8, batch_size=4, lr=5e-3, eval_max_examples=4,
             eval_max_new_tokens=2, progress=False, log_every=1000, device="cpu")


def _cfg(model, data, out, **kw):
    return TrainConfig(data=str(data), output=str(out), model=str(model), **{**SMALL, **kw})


def test_methods_hit_the_budget(skewed_tiny, arith_file, tmp_path):
    results = {}
    for method in ("drlora", "lora", "static"):
        s = train(_cfg(skewed_tiny, arith_file, tmp_path / method, method=method, max_steps=12))
        ranks = torch.tensor(s["ranks"])
        assert ranks.sum(1).tolist() == [16 * 4] * 4, method  # per layer N * r_target
        ad = read_adapter(tmp_path / method)
        assert ad.config.expert_ranks("up").tolist() == ranks.tolist()
        assert ad.config.provenance["method"] == method
        results[method] = ranks
    assert results["lora"].unique().tolist() == [4]
    for method in ("drlora", "static"):  # uneven, and the favoured experts get more
        r = results[method]
        assert r.min() >= 2 and r.max() <= 8 and len(r.unique()) > 1
        fav = r[:, list(FAVOURITES)].float().mean()
        assert fav > r.float().mean(), (method, r)


def test_resume_reproduces_uninterrupted_run(tiny_path, arith_file, tmp_path):
    full = tmp_path / "full"
    s1 = train(_cfg(tiny_path, arith_file, full, max_steps=12, checkpoint_every=6))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint", resumed / "checkpoint")  # the state after step 6
    s2 = train(_cfg(tiny_path, arith_file, resumed, max_steps=12, resume=True))
    assert s1["ranks"] == s2["ranks"]
    a, b = read_adapter(full), read_adapter(resumed)
    for k, v in a.tensors.items():
        assert torch.allclose(v, b.tensors[k], atol=1e-6, rtol=0), k
    h1 = (full / "rank_history.json").read_text()
    assert h1 == (resumed / "rank_history.json").read_text()
    assert len(__import__("json").loads(h1)) > 3  # growth happened before and after step 6


def test_train_router_ships_router_weights(tiny_path, arith_file, tmp_path):
    from tests.train.conftest import load_tiny

    train(_cfg(tiny_path, arith_file, tmp_path / "r", method="lora", max_steps=4, train_router=True,
               warmup_ratio=0.25))
    ad = read_adapter(tmp_path / "r")
    assert ad.config.train_router
    base = load_tiny(tiny_path).model.layers[0].mlp.gate.weight
    assert not torch.equal(ad.router_weight(0), base)  # trained after the 1 warm-up step


def test_resume_refuses_other_settings(tiny_path, arith_file, tmp_path):
    import json

    import pytest

    from drlora_train import checkpoint as ckpt
    from drlora_train.config import ConfigError

    out = tmp_path / "o"
    train(_cfg(tiny_path, arith_file, out, max_steps=4, checkpoint_every=2, eval_max_examples=0))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(l + "\n" for l in arith_file.read_text().splitlines()[:40]))
    for kw, msg in ((dict(max_steps=6), "--max-steps: checkpoint 4, now 6"),
                    (dict(r_max=16), "--r-max: checkpoint 8, now 16"),  # was a traceback in restore
                    (dict(targets=("gate", "up", "down")), "--targets: checkpoint up,down, now gate,up,down"),
                    (dict(method="lora"), "--method: checkpoint drlora, now lora"),
                    (dict(lr=1e-3), "--lr: checkpoint 0.005, now 0.001"),
                    (dict(seed=1, batch_size=2), "--batch-size: checkpoint 4, now 2; --seed: checkpoint 0, now 1"),
                    (dict(data=str(other)), f"--data: checkpoint {arith_file} (sha256 "),
                    (dict(model="tiny-mixtral"), "--model: checkpoint ")):
        with pytest.raises(ConfigError, match="--resume: .* was made with other settings: " + re.escape(msg)):
            kw = {"max_steps": 4, **kw, "resume": True}
            train(_cfg(kw.pop("model", tiny_path), kw.pop("data", arith_file), out, **kw))
    # a checkpoint from before resume keys: compared on its raw config
    state = ckpt.load(out)
    del state["resume_key"]
    ckpt.save(out, state)
    with pytest.raises(ConfigError, match="--max-steps: checkpoint 4, now 5"):
        train(_cfg(tiny_path, arith_file, out, max_steps=5, resume=True))
    # settings that do not change the adapter may differ
    s = train(_cfg(tiny_path, arith_file, out, max_steps=4, resume=True, log_every=1, eval_max_examples=1,
                   checkpoint_every=0))
    assert s["steps"] == 4
    assert json.loads((out / "rank_history.json").read_text())[-1]["step"] == 4
    # a fresh run drops the earlier run's checkpoint: a later --resume cannot continue it
    train(_cfg(tiny_path, arith_file, out, max_steps=2, eval_max_examples=0))
    assert not (out / "checkpoint").exists()


def test_eval_failure_keeps_the_adapter(tiny_path, arith_file, tmp_path, monkeypatch, capsys):
    """Also: uniform LoRA ignores r_init (8 > r_target 4 is fine), --max-length beyond the
    model's positions is clamped with a warning, and the summary counts ranks as the budget."""
    import drlora_train.run as run_mod

    def broken(*a, **k):
        raise RuntimeError("shape '[2, -1]' is invalid\nsecond line")

    monkeypatch.setattr(run_mod, "evaluate", broken)
    out = tmp_path / "o"
    s = train(_cfg(tiny_path, arith_file, out, method="lora", r_init=8, max_steps=2, max_length=100_000))
    ad = read_adapter(out)
    assert ad.config.provenance["eval"] == {"error": "RuntimeError: shape '[2, -1]' is invalid"}
    assert ad.config.provenance["r_init"] == 4 and ad.config.expert_ranks("up").unique().tolist() == [4]
    assert s["eval"] == ad.config.provenance["eval"]
    cap = capsys.readouterr()
    assert "warning: evaluation failed (RuntimeError" in cap.err
    assert "--max-length 100000 is more than" in cap.err and "using 512" in cap.err
    assert f"({4 * 16 * 4} expert ranks on up,down," in cap.out  # as the budget: L x E x r_target


def test_batch_smaller_than_processes_refused(tiny_path, arith_file, tmp_path, monkeypatch):
    import pytest

    import drlora_train.run as run_mod
    from drlora_train.config import ConfigError
    from drlora_train.distributed import Dist

    monkeypatch.setattr(run_mod.dd, "init", lambda device: Dist(0, 4, 0))
    with pytest.raises(ConfigError, match="--batch-size 2 is smaller than the 4 processes"):
        train(_cfg(tiny_path, arith_file, tmp_path / "o", batch_size=2))
