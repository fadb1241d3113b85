"""gradlane.deepspeed on 2 CPU ranks (gloo): engine arguments from a gradlane config, the
collectives over deepspeed.comm, and every compression in place of DeepSpeed's all-reduce
at ZeRO 0, against DeepSpeed's own all-reduce (lossless settings) and the DDP hook (lossy)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from engine_cases import LOSSLESS, LOSSY, LR, STEPS, batch, ddp_reference, flat, held_out, loss_of
from engine_cases import net as make_net
from mp_utils import run_ranks

from gradlane.errors import ConfigError

pytest.importorskip("deepspeed")


def _config(zero_stage=0, precision="fp32", accumulate=1):
    return {
        "run": {"steps": STEPS},
        "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.5},
        "data": {"batch_size": 16},
        "deepspeed": {
            "zero_stage": zero_stage,
            "precision": precision,
            "gradient_accumulation_steps": accumulate,
        },
    }


def _train(rank, comm_cfg, **ds):
    import deepspeed

    from gradlane.deepspeed import Compression, build

    model = make_net()
    engine, _, _, _ = deepspeed.initialize(**build(_config(**ds), model))
    compression = Compression(engine, comm_cfg)
    losses = []
    for step in range(STEPS):
        loss = loss_of(engine, batch(rank, step))
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            compression.average()
        engine.step()
        losses.append(loss.item())
    return {
        "params": flat(model),
        "losses": losses,
        "held_out": held_out(model),
        "metrics": compression.metrics(),
    }


def _collectives(rank, world):
    from gradlane.deepspeed import DeepSpeedCollective

    comm = DeepSpeedCollective()
    x = torch.randn(6, generator=torch.Generator().manual_seed(rank))
    ours, want = x.clone(), x.clone()
    comm.all_reduce(ours, async_op=True).wait()
    dist.all_reduce(want)
    want_rows = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(want_rows, x)
    root = x.clone()
    comm.broadcast(root)
    return (ours, want), (comm.all_gather(x), torch.stack(want_rows)), root


def _runs(rank, world):
    out = {"collectives": _collectives(rank, world), "oracle": _train(rank, {"hook": "none"})}
    out["lossless"] = {name: _train(rank, cfg) for name, cfg in LOSSLESS.items()}
    out["lossy"] = {
        name: (_train(rank, cfg), ddp_reference(rank, cfg)) for name, cfg in LOSSY.items()
    }
    out["bf16"] = _train(rank, LOSSY["powersgd"], precision="bf16")
    try:
        _train(rank, LOSSY["powersgd"], zero_stage=1)
    except ConfigError as exc:
        out["zero1"] = str(exc)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_runs, 2, timeout_s=300)


def test_collectives_match_torch_distributed(runs):
    for out in runs:
        for ours, want in out["collectives"][:2]:
            torch.testing.assert_close(ours, want)
    torch.testing.assert_close(runs[0]["collectives"][2], runs[1]["collectives"][2])


def test_lossless_compression_matches_deepspeeds_own_all_reduce(runs):
    for out in runs:
        start = held_out(make_net())
        assert out["oracle"]["held_out"] < 0.8 * start
        assert out["oracle"]["metrics"] == {"comm/bytes_per_step": 4 * 763}
        for name, got in out["lossless"].items():
            torch.testing.assert_close(
                got["params"], out["oracle"]["params"], rtol=1e-4, atol=1e-5, msg=name
            )
    torch.testing.assert_close(runs[0]["oracle"]["params"], runs[1]["oracle"]["params"])


def test_lossy_compression_matches_the_ddp_hook(runs):
    for out in runs:
        start, oracle = held_out(make_net()), out["oracle"]["held_out"]
        for name, (got, ddp) in out["lossy"].items():
            torch.testing.assert_close(got["params"], ddp["params"], rtol=1e-4, atol=1e-5, msg=name)
            assert got["metrics"]["comm/bytes_per_step"] == ddp["metrics"]["comm/bytes_per_step"]
            assert got["metrics"]["comm/compression_ratio"] > 1.5, name
            assert got["held_out"] < start - 0.5 * (start - oracle), name
    for name in LOSSY:
        torch.testing.assert_close(
            runs[0]["lossy"][name][0]["params"], runs[1]["lossy"][name][0]["params"]
        )


def test_bf16_autocast_compresses_fp32_gradients(runs):
    for out in runs:
        got, fp32 = out["bf16"], out["lossy"]["powersgd"][0]
        assert got["metrics"]["comm/compression_ratio"] == fp32["metrics"]["comm/compression_ratio"]
        # bf16 forward: close to the fp32 run, not equal to it
        assert 0 < (got["params"] - fp32["params"]).abs().max() < 0.05
    torch.testing.assert_close(runs[0]["bf16"]["params"], runs[1]["bf16"]["params"])


def test_compression_under_zero_1_is_refused(runs):
    for out in runs:
        assert out["zero1"] == (
            "comm.hook='powersgd' needs ZeRO stage 0 without fp16 mode "
            "(the engine runs stage 1, fp16 False)"
        )


def test_build_maps_a_gradlane_config():
    from gradlane.deepspeed import build

    args = build(_config(zero_stage=2, precision="bf16", accumulate=4))
    assert args == {
        "config": {
            "train_micro_batch_size_per_gpu": 16,
            "gradient_accumulation_steps": 4,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
            "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
        }
    }
    model = make_net()
    full = build({"optimizer": {"name": "mfac", "lr": 0.01, "ngrads": 4}}, model)
    assert type(full["optimizer"]).__name__ == "MFAC" and full["model"] is model
    assert full["lr_scheduler"].optimizer is full["optimizer"]
