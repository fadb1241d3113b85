"""M-FAC as a DeepSpeed client optimizer: 2 CPU ranks on gloo, ZeRO 0, 1, 2 (3 is refused)."""

from __future__ import annotations

import pytest
import torch
from mp_utils import run_ranks

from gradlane.optimizers import MFAC

pytest.importorskip("deepspeed")

STAGES = (0, 1, 2)
STEPS = 12


def _batch(rank):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(10 + rank))
    return x, 0.5 * x.sum(1, keepdim=True)


def _engine(stage, seed):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    # under ZeRO-1/2 the window follows DeepSpeed's partition whatever shard_window says
    shard = stage != 1
    opt = MFAC(model.parameters(), lr=0.1, ngrads=6, damp=0.5, momentum=0.5, shard_window=shard)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # DeepSpeed's gate for client optimizers
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, model, opt


def _train(engine, batch, steps):
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(engine(batch[0]), batch[1])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def deepspeed_ranks(rank, world, ckpt_dir):
    import deepspeed

    # DeepSpeed's CPU accelerator would pick oneCCL when it is installed; gloo is always there.
    deepspeed.init_distributed(dist_backend="gloo")
    batch = _batch(rank)  # a fixed batch per rank: the loss must fall
    out = {}
    for stage in STAGES:
        engine, model, opt = _engine(stage, seed=0)
        out[stage] = {
            "losses": _train(engine, batch, STEPS),
            "declared": sum(p.numel() for p in model.parameters()),
            "layout": opt._shard.layout,
            "window": tuple(opt.state["mfac"]["rows"].shape),
            "params": _flat(model),
        }
    # a ZeRO-2 checkpoint mid-window carries MFAC's state: the resumed run continues exactly
    engine, model, _ = _engine(2, seed=0)
    _train(engine, batch, 4)
    engine.save_checkpoint(ckpt_dir, tag="mid")
    _train(engine, batch, 5)
    resumed, resumed_model, resumed_opt = _engine(2, seed=1)
    resumed.load_checkpoint(ckpt_dir, tag="mid")
    out["resume_count"] = resumed_opt.state["mfac"]["count"]
    _train(resumed, batch, 5)
    out["resume"] = (_flat(model), _flat(resumed_model))
    # ZeRO-3 partitions the model's parameters themselves: refused, not silently per-shard
    try:
        engine, _, _ = _engine(3, seed=0)
        _train(engine, batch, 1)
        out["zero3"] = None
    except ValueError as err:
        out["zero3"] = str(err)
    return out


def test_deepspeed_zero_stages_train_with_mfac(tmp_path):
    ranks = run_ranks(deepspeed_ranks, 2, str(tmp_path), init=False, timeout_s=300)
    for out in ranks:
        for stage in STAGES:
            losses = out[stage]["losses"]
            assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, (stage, losses)
        # stages 1/2: MFAC holds this rank's flat fp32 partition; the window is that partition
        for stage in (1, 2):
            assert out[stage]["layout"] == "partitioned"
            assert out[stage]["window"][1] <= out[stage]["declared"] // 2 + 8  # + ZeRO's padding
        # every stage runs the same algorithm on the same averaged gradients
        for stage in (1, 2):
            torch.testing.assert_close(out[stage]["params"], out[0]["params"], rtol=1e-5, atol=1e-6)
    # stage 0: the engine hands MFAC full gradients; MFAC slices the window itself
    assert [out[0]["layout"] for out in ranks] == ["sliced", "sliced"]
    assert [out[0]["window"] for out in ranks] == [(6, 129), (6, 128)]  # 257 parameters
    assert torch.equal(ranks[0][2]["params"], ranks[1][2]["params"])
    for out in ranks:
        assert out["resume_count"] == 4
        assert torch.equal(*out["resume"])
        assert "sharded by DeepSpeed ZeRO-3" in out["zero3"], out["zero3"]
