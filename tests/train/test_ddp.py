"""2 gloo processes on one global batch grow the same experts as 1 process."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from drlora.adapter_format import read_adapter
from drlora_train.config import TrainConfig
from drlora_train.run import train

KW = dict(r_init=2, r_target=4, r_max=8, batch_size=4, lr=5e-3, max_steps=10, eval_max_examples=2,
          eval_max_new_tokens=1, progress=False, log_every=1000, device="cpu")


def _worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_grow_the_same_experts(skewed_tiny, arith_file, tmp_path):
    one = TrainConfig(data=str(arith_file), output=str(tmp_path / "one"), model=str(skewed_tiny), **KW)
    two = TrainConfig(data=str(arith_file), output=str(tmp_path / "two"), model=str(skewed_tiny), **KW)
    train(one)
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    h1 = json.loads((tmp_path / "one" / "rank_history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "rank_history.json").read_text())
    assert [h["ranks"] for h in h1] == [h["ranks"] for h in h2]
    assert len(h1) > 2  # there were growth events
    a, b = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    assert b.config.provenance["world_size"] == 2
    for k, v in a.tensors.items():
        # Adam divides by sqrt(v): float-order differences in tiny grads show up at ~lr scale
        assert (v - b.tensors[k]).abs().max() < 5e-3, (k, (v - b.tensors[k]).abs().max())
        assert (v - b.tensors[k]).abs().mean() < 1e-4, (k, (v - b.tensors[k]).abs().mean())
