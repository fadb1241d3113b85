"""Sharded M-FAC windows on 2 real gloo processes equal the unsharded optimizer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from mp_utils import run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

import gradlane
from gradlane.optimizers import MFAC

SETTINGS = {"lr": 0.02, "ngrads": 5, "damp": 1e-2, "momentum": 0.5, "weight_decay": 1e-3}


def _model(dtype):
    torch.manual_seed(0)  # the same initial weights on every rank
    # 6*9 + 9 + 9*3 + 3 = 93 parameters: an odd count, so the two slices differ in width
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(
        dtype
    )


def _batches(rank, dtype, steps=14):
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    return [
        (
            torch.randn(4, 6, generator=gen, dtype=dtype),
            torch.randn(4, 3, generator=gen, dtype=dtype),
        )
        for _ in range(steps)
    ]


def _train(ddp, opt, batch, poison=False):
    opt.zero_grad()
    x, y = batch
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    if poison:  # a NaN in the last parameter: inside rank 1's slice only
        list(ddp.parameters())[-1].grad[-1] = float("nan")
    opt.step()


def sliced_vs_dense(rank, world, window_dtype):
    dtype = torch.float64 if window_dtype == "float64" else torch.float32
    dense_model, sharded_model = DDP(_model(dtype)), DDP(_model(dtype))
    dense = MFAC(dense_model.parameters(), window_dtype=window_dtype, **SETTINGS)
    cfg = {"name": "mfac", "shard_window": True, "window_dtype": window_dtype, **SETTINGS}
    sharded = gradlane.build_optimizer(cfg, sharded_model.parameters())
    batches = _batches(rank, dtype)
    for step, batch in enumerate(batches[:9]):
        _train(dense_model, dense, batch, poison=step == 6)
        _train(sharded_model, sharded, batch, poison=step == 6)
    # resume the sharded optimizer from its state_dict mid-window, then go on
    resumed = MFAC(
        sharded_model.parameters(), shard_window=True, window_dtype=window_dtype, **SETTINGS
    )
    resumed.load_state_dict(sharded.state_dict())
    for batch in batches[9:]:
        _train(dense_model, dense, batch)
        _train(sharded_model, resumed, batch)
    flat = [
        torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        for m in (dense_model, sharded_model)
    ]
    return {
        "dense": flat[0],
        "sharded": flat[1],
        "layout": resumed._shard.layout,
        "window": tuple(resumed.state["mfac"]["rows"].shape),
        "dense_window": tuple(dense.state["mfac"]["rows"].shape),
        "skipped": (dense.skipped_steps, resumed.skipped_steps),
    }


def test_sliced_window_equals_dense_fp64_and_resumes():
    results = run_ranks(sliced_vs_dense, 2, "float64")
    for r in results:
        torch.testing.assert_close(r["sharded"], r["dense"], rtol=1e-10, atol=1e-12)
        assert r["layout"] == "sliced" and r["skipped"] == (1, 1)
    assert torch.equal(results[0]["sharded"], results[1]["sharded"])  # same update on every rank
    # memory: each rank stores ~1/2 of every window gradient, 93 = 47 + 46 columns
    assert results[0]["dense_window"] == (5, 93)
    assert [r["window"] for r in results] == [(5, 47), (5, 46)]


def test_sliced_window_equals_dense_fp32():
    for r in run_ranks(sliced_vs_dense, 2, "float32"):
        torch.testing.assert_close(r["sharded"], r["dense"], rtol=1e-6, atol=1e-6)


def partitioned_vs_dense(rank, world):
    """What DeepSpeed ZeRO-1/2 does: hand each rank a flat partition of the parameters."""
    model = _model(torch.float64)
    params = list(model.parameters())
    dense = MFAC(params, window_dtype="float64", **SETTINGS)
    full = torch.cat([p.detach().reshape(-1) for p in params])
    width = -(-full.numel() // world)
    padded = torch.cat([full, full.new_zeros(width * world - full.numel())])
    part = padded[rank * width : (rank + 1) * width].clone().requires_grad_()
    zero_like = MFAC(
        [torch.zeros_like(full, requires_grad=True)], window_dtype="float64", **SETTINGS
    )
    zero_like.param_groups[0]["params"] = [part]  # the swap ZeRO makes before the first step
    for x, y in _batches(rank, torch.float64):
        dense.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(grad)
        grad /= world
        for p, g in zip(params, grad.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))
        part.grad = torch.cat([grad, grad.new_zeros(width * world - grad.numel())])[
            rank * width : (rank + 1) * width
        ].clone()
        dense.step()
        zero_like.step()
    pieces = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(pieces, part.detach())
    return {
        "dense": torch.cat([p.detach().reshape(-1) for p in params]),
        "gathered": torch.cat(pieces)[: full.numel()],
        "layout": zero_like._shard.layout,
        "window": tuple(zero_like.state["mfac"]["rows"].shape),
    }


def test_partitioned_parameters_share_one_fisher_across_ranks():
    for r in run_ranks(partitioned_vs_dense, 2):
        assert r["layout"] == "partitioned" and r["window"] == (5, 47)
        torch.testing.assert_close(r["gathered"], r["dense"], rtol=1e-10, atol=1e-12)


def _frozen_model():
    """_model(fp64) with the first layer's bias frozen (9 of its 93 parameters)."""
    model = _model(torch.float64)
    model[0].bias.requires_grad_(False)
    return model


def frozen_after_building(rank, world, shard_window):
    """Freeze a parameter after building MFAC, before its first step, then train under DDP."""
    model = _model(torch.float64)
    opt = MFAC(model.parameters(), window_dtype="float64", shard_window=shard_window, **SETTINGS)
    model[0].bias.requires_grad_(False)
    ddp = DDP(model)  # DDP averages the gradients of the trainable parameters only
    for batch in _batches(rank, torch.float64):
        _train(ddp, opt, batch)
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "layout": opt._shard.layout,
        "window": tuple(opt.state["mfac"]["rows"].shape),
    }


def test_freezing_before_the_first_step_under_ddp_equals_one_process():
    # the reference: one process, the frozen parameter never handed to MFAC, each step on
    # both ranks' batches at once (the mean loss over 8 rows = the mean of the ranks' losses)
    model = _frozen_model()
    opt = MFAC(
        [p for p in model.parameters() if p.requires_grad], window_dtype="float64", **SETTINGS
    )
    both = zip(_batches(0, torch.float64), _batches(1, torch.float64), strict=True)
    for (x0, y0), (x1, y1) in both:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
    want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for shard_window, layout, windows in ((False, "dense", [84, 84]), (True, "sliced", [42, 42])):
        for r, width in zip(
            run_ranks(frozen_after_building, 2, shard_window), windows, strict=True
        ):
            assert r["layout"] == layout and r["window"] == (5, width)
            torch.testing.assert_close(r["params"], want, rtol=1e-10, atol=1e-12)


def wrapper_sharded(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    messages = {}
    for name in ("fsdp", "fsdp_orig_params", "fully_shard"):
        model = _model(torch.float32)
        if name == "fully_shard":
            fully_shard(model)
        else:
            cpu = torch.device("cpu")
            model = FSDP(model, device_id=cpu, use_orig_params=name == "fsdp_orig_params")
        try:
            MFAC(model.parameters(), **SETTINGS)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    return messages


def test_parameters_sharded_by_fsdp_are_refused_with_a_clear_error():
    messages = run_ranks(wrapper_sharded, 2)[0]
    assert "FSDP (a flat or flattened parameter)" in messages["fsdp"]
    assert "FSDP (a flat or flattened parameter)" in messages["fsdp_orig_params"]
    assert "DTensor (FSDP2 fully_shard" in messages["fully_shard"]
    for message in messages.values():
        assert "\n" not in message and "ZeRO stage 1 or 2" in message
