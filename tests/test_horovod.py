"""Horovod on 2 CPU ranks (Gloo): the rendezvous over a torch group, its collectives against
torch.distributed, and `gradlane.horovod.DistributedOptimizer` with every compression
against Horovod's own DistributedOptimizer (lossless settings) and the DDP hook (lossy).

Horovod comes from `make horovod`; when it is missing these tests fail with the build's
error, they are never skipped."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from engine_cases import (
    LOSSLESS,
    LOSSY,
    LR,
    STEPS,
    batch,
    ddp_reference,
    flat,
    held_out,
    loss_of,
    net,
)
from mp_utils import run_ranks


@pytest.fixture(scope="module", autouse=True)
def horovod_installed():
    from gradlane.horovod_build import FAILED_LOG, HOROVOD_VERSION, cache_dir, works

    if not works():
        log = cache_dir() / FAILED_LOG
        detail = log.read_text()[-3000:] if log.exists() else "run `make horovod`"
        pytest.fail(f"horovod {HOROVOD_VERSION} is not usable: {detail}", pytrace=False)


def _collectives(rank, world):
    from gradlane.horovod import HorovodCollective, init_from_torch, shutdown

    init_from_torch()
    comm = HorovodCollective()
    x = torch.randn(6, generator=torch.Generator().manual_seed(rank))
    ours, want = x.clone(), x.clone()
    comm.all_reduce(ours)
    dist.all_reduce(want)
    later = x.clone()
    comm.all_reduce(later, async_op=True).wait()
    gathered = comm.all_gather(x.view(2, 3))
    want_gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(want_gathered, x)
    root = x.clone()
    comm.broadcast(root)
    out = {
        "rank": (comm.rank, comm.world),
        "sum": (ours, want, later),
        "gather": (gathered, torch.stack(want_gathered).view(world, 2, 3)),
        "broadcast": root,
        "bytes": (comm.payload, comm.sent, comm.received),
    }
    shutdown()
    return out


def test_rendezvous_and_collectives_match_torch_distributed():
    ranks = run_ranks(_collectives, 2)
    for rank, out in enumerate(ranks):
        assert out["rank"] == (rank, 2)
        ours, want, later = out["sum"]
        torch.testing.assert_close(ours, want)
        torch.testing.assert_close(later, want)
        torch.testing.assert_close(*out["gather"])
    torch.testing.assert_close(ranks[1]["broadcast"], ranks[0]["broadcast"])
    # payload: 2 all-reduces + 1 all-gather of 24 bytes each, + the broadcast from rank 0
    assert [out["bytes"][0] for out in ranks] == [96, 72]
    # ring model, W=2: all-reduce n, all-gather n, broadcast n/2 on each link direction
    assert [out["bytes"][1] for out in ranks] == [24 + 24 + 24 + 12] * 2


def _train(rank, optimizer_of, steps=STEPS):
    model = net()
    opt = optimizer_of(model)
    losses = []
    for step in range(steps):
        opt.zero_grad()  # Horovod's own optimizer takes no set_to_none
        loss = loss_of(model, batch(rank, step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def _ours(cfg):
    from gradlane.horovod import DistributedOptimizer

    settings = {k: v for k, v in cfg.items() if k != "hook"}

    def make(model):
        inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
        return DistributedOptimizer(inner, model.named_parameters(), cfg["hook"], **settings)

    return make


def _optimizers(rank, world):
    import horovod.torch as hvd

    from gradlane.horovod import init_from_torch, shutdown

    init_from_torch()

    def horovods_own(model):
        inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
        return hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())

    model, _, _ = _train(rank, horovods_own)
    out = {"oracle": flat(model), "held_out": (held_out(net()), held_out(model))}
    out |= {"lossless": {}, "lossy": {}}
    for name, cfg in LOSSLESS.items():
        model, opt, _ = _train(rank, _ours(cfg))
        out["lossless"][name] = (flat(model), opt.metrics())
    for name, cfg in LOSSY.items():
        model, opt, losses = _train(rank, _ours(cfg))
        out["lossy"][name] = {
            "params": flat(model),
            "losses": losses,
            "held_out": held_out(model),
            "metrics": opt.metrics(),
            "ddp": ddp_reference(rank, cfg),
        }

    # resume under a decaying schedule: 5 steps, save, 3 more == restored from the save, 3 more
    def train(model, opt, schedule, steps):
        for step in steps:
            opt.zero_grad(set_to_none=True)
            loss_of(model, batch(rank, step)).backward()
            opt.step()
            schedule.step()

    def start(model):
        opt = _ours(LOSSY["powersgd"])(model)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    model = net()
    opt, schedule = start(model)
    train(model, opt, schedule, range(5))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), schedule.state_dict()))
    train(model, opt, schedule, range(5, STEPS))
    resumed = net()
    ropt, rschedule = start(resumed)
    resumed.load_state_dict(saved[0])
    ropt.load_state_dict(saved[1])
    rschedule.load_state_dict(saved[2])
    train(resumed, ropt, rschedule, range(5, STEPS))
    out["resume"] = (flat(model), flat(resumed), bool(ropt.exchange.errors))
    shutdown()
    return out


@pytest.fixture(scope="module")
def optimizer_runs():
    return run_ranks(_optimizers, 2, timeout_s=300)


def test_lossless_compression_matches_horovods_own_optimizer(optimizer_runs):
    for out in optimizer_runs:
        for name, (params, metrics) in out["lossless"].items():
            torch.testing.assert_close(params, out["oracle"], rtol=1e-4, atol=1e-5, msg=name)
            assert metrics["comm/bytes_per_step"] > 0, name
        # plain all-reduce: every fp32 gradient once (24*12+24 + 16*24+16 + 3*16+3 = 763)
        assert out["lossless"]["none"][1]["comm/bytes_per_step"] == 4 * 763
    torch.testing.assert_close(optimizer_runs[0]["oracle"], optimizer_runs[1]["oracle"])


def test_lossy_compression_matches_the_ddp_hook_and_trains(optimizer_runs):
    for out in optimizer_runs:
        start, oracle = out["held_out"]
        assert oracle < 0.8 * start
        for name, got in out["lossy"].items():
            ddp = got["ddp"]
            torch.testing.assert_close(got["params"], ddp["params"], rtol=1e-4, atol=1e-5, msg=name)
            assert got["losses"] == pytest.approx(ddp["losses"], rel=1e-4), name
            # the same bytes as the hook, fewer than plain all-reduce
            assert got["metrics"]["comm/bytes_per_step"] == ddp["metrics"]["comm/bytes_per_step"]
            assert got["metrics"]["comm/compression_ratio"] > 1.5, name
            # it learns: most of the uncompressed run's progress on held-out data
            assert got["held_out"] < start - 0.5 * (start - oracle), name
    for name in LOSSY:  # every rank applies the same averaged update
        torch.testing.assert_close(
            optimizer_runs[0]["lossy"][name]["params"], optimizer_runs[1]["lossy"][name]["params"]
        )


def test_state_dict_resumes_exactly(optimizer_runs):
    for out in optimizer_runs:
        uninterrupted, resumed, has_residuals = out["resume"]
        assert has_residuals
        assert torch.equal(uninterrupted, resumed)


def test_bad_named_parameters_are_refused():
    from gradlane.horovod import DistributedOptimizer

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="misses 1 of the optimizer's parameters"):
        DistributedOptimizer(opt, named[1:])
    with pytest.raises(ValueError, match="repeats names: 0.weight"):
        DistributedOptimizer(opt, [named[0], *named])


HOSTS = {
    "one host": ["a", "a", "a", "a"],
    "two hosts": ["a", "a", "b", "b"],
    "uneven": ["a", "a", "a", "b"],
}


@pytest.mark.parametrize("case", HOSTS)
def test_slot_plan_matches_horovods_host_assignment(case):
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    from gradlane.horovod import _slots

    hosts = HOSTS[case]
    spec = ",".join(f"{h}:{hosts.count(h)}" for h in dict.fromkeys(hosts))
    want = get_host_assignments(parse_hosts(spec), len(hosts))
    assert _slots(hosts) == [
        {k: getattr(s, k) for k in ("hostname", "rank", "size", "local_rank", "local_size",
                                    "cross_rank", "cross_size")}
        for s in want
    ]  # fmt: skip
