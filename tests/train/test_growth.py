import pytest
import torch

from drlora_train.growth import (GrowthParams, event_quota, grow, grow_layer, initial_ranks,
                                 plan_schedule, proportional_ranks)

P = GrowthParams(8, 16, 32, 0.1)  # step cap floor(24 * 0.1) = 2


def test_quota_and_cap():
    assert P.step_cap == 2
    assert event_quota(64, P, 10) == 52  # ceil(64 * 8 / 10)
    ranks = torch.full((16,), 8)
    sal = torch.arange(16, dtype=torch.float64)  # expert 15 most salient
    new = grow_layer(ranks, sal, P, quota=5, last=False)
    # 15 and 14 get the step cap 2, 13 gets the last 1 of the quota
    assert new.tolist() == [8] * 13 + [9, 10, 10]


def test_cap_at_r_max_and_budget():
    ranks = torch.tensor([31, 8, 8, 8])  # budget 4 * 16 = 64, used 55
    new = grow_layer(ranks, torch.tensor([4.0, 3, 2, 1]), P, quota=100, last=False)
    assert new.tolist() == [32, 10, 10, 10]  # 31 -> 32 capped by r_max; quota capped by budget
    assert int(new.sum()) <= 64


def test_last_event_tops_up_exactly():
    ranks = torch.full((8,), 8)
    new = grow_layer(ranks, torch.linspace(1, 0, 8), P, quota=4, last=True)
    assert int(new.sum()) == 8 * 16 and int(new.max()) <= 32 and int(new.min()) >= 8
    assert new[0] >= new[-1]


def test_last_event_trims_excess():
    ranks = torch.tensor([20, 20, 20, 10])  # 70 > 64
    new = grow_layer(ranks, torch.tensor([4.0, 3, 2, 1]), P, quota=0, last=True)
    assert int(new.sum()) == 64 and new.min() >= 8


def test_deterministic_ties():
    ranks = torch.full((6,), 8)
    a = grow_layer(ranks, torch.zeros(6), P, quota=3, last=False)
    b = grow_layer(ranks, torch.zeros(6), P, quota=3, last=False)
    assert a.tolist() == b.tolist() == [10, 9, 8, 8, 8, 8]  # ties by index


def test_full_schedule_hits_budget_per_layer():
    torch.manual_seed(0)
    L, E = 3, 16
    sched = plan_schedule(1000, 30, 200, 200)
    # T_buffer 200 -> 100 (10%): t_end 900, floor(870 / 200) = 4 events
    assert sched.events == (230, 430, 630, 830)
    ranks = initial_ranks("drlora", L, E, P)
    for i, _ in enumerate(sched.events):
        ranks = grow(ranks, torch.rand(L, E), P, len(sched.events), last=i == len(sched.events) - 1)
    assert ranks.sum(1).tolist() == [E * 16] * L
    assert ranks.max() <= 32 and ranks.min() >= 8


def test_schedule_shrinks_for_short_runs():
    s = plan_schedule(200, 6, 200, 200)
    assert s.t_end == 180 and s.t_grow == 43 and len(s.events) == 4 and s.notes
    s = plan_schedule(5000, 150, 200, 200)
    assert s.t_grow == 200 and s.t_end == 4800 and not s.notes
    s = plan_schedule(2, 1, 200, 200)
    assert len(s.events) >= 1


def test_proportional_ranks_exact_sum():
    f = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])
    r = proportional_ranks(f, 8 * 16, 8, 32)
    assert int(r.sum()) == 128 and r.max() <= 32 and r.min() >= 8
    assert r[0] == 32 and r[0] >= r[1] >= r[2]
    with pytest.raises(ValueError):
        proportional_ranks(f, 8 * 40, 8, 32)
