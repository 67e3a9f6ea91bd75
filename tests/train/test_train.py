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
