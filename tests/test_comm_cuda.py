"""Every comm hook on CUDA: NCCL at world size 1 against the oracle, and the exchange
never waits on the GPU (torch's sync debug mode set to raise). Skipped without CUDA.

At world size 1 the mean over ranks is the gradient itself: lossless settings
must return it and leave no residual; every setting must conserve it,
applied + e_new = g + e_old, with g from autograd on the bare module."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradlane.comm import register_comm_hook
from gradlane.compressors import QSGD, Cast, GradientExchange, PowerSGD, TopK, TorchCollective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOSSLESS = {
    "powersgd": {"hook": "powersgd", "rank": 64, "min_compression_rate": 0.0, "start_iter": 0},
    "topk": {"hook": "topk", "density": 1.0, "start_iter": 0},
    "qsgd": {"hook": "qsgd", "bits": 32, "start_iter": 0},
}
LOSSY = {
    "powersgd": {"hook": "powersgd", "rank": 2, "start_iter": 1},
    "topk": {"hook": "topk", "density": 0.05, "start_iter": 1},
    "qsgd": {"hook": "qsgd", "bits": 3, "start_iter": 1},
    "fp16": {"hook": "fp16"},
    "bf16": {"hook": "bf16"},
    "lgreco-powersgd": {
        "hook": "lgreco",
        "rank": 4,
        "start_iter": 1,
        "adjust_every": 2,
        "accumulate": 1,
    },  # fmt: skip
    "lgreco-qsgd": {
        "hook": "lgreco",
        "compressor": "qsgd",
        "start_iter": 1,
        "adjust_every": 2,
        "accumulate": 1,
    },  # fmt: skip
}


@pytest.fixture(scope="module")
def nccl():
    if dist.is_initialized():
        pytest.skip("another test left a process group initialised")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)
    ).cuda()


@pytest.mark.parametrize("name", [*(f"lossless-{k}" for k in LOSSLESS), *LOSSY])
def test_every_hook_on_nccl_conserves_the_gradient(nccl, name):
    cfg = LOSSLESS[name.removeprefix("lossless-")] if name.startswith("lossless") else LOSSY[name]
    model = _model()
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.01)
    state = register_comm_hook(ddp, cfg).state
    x = torch.randn(32, 64, device="cuda")
    tol = {"fp16": 1e-3, "bf16": 1e-2}.get(name, 1e-5)
    for step in range(5):
        x = x.roll(1, 0) + 0.1 * step
        truth = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        before = {n: e.clone() for n, e in state.errors.items()}
        model.zero_grad(set_to_none=True)
        ddp(x).square().mean().backward()
        for (n, p), g in zip(model.named_parameters(), truth, strict=True):
            zero = torch.zeros_like(g)
            gap = p.grad + state.errors.get(n, zero) - g - before.get(n, zero)
            assert float(gap.abs().max()) <= tol * float(g.abs().max()), (name, step, n)
            if name.startswith("lossless"):
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    assert state.metrics()["comm/nonfinite_steps"] == 0


@pytest.mark.parametrize(
    "compressor",
    [PowerSGD(2), PowerSGD(8), TopK(0.05), QSGD(4), Cast("fp16"), Cast("bf16")],
    ids=lambda c: f"{c.name}-{c.default}",
)
def test_the_exchange_never_waits_on_the_gpu(nccl, compressor):
    model = _model()
    exchange = GradientExchange(model, compressor, TorchCollective(dist.new_group()))
    names = [n for n, _ in model.named_parameters()]
    grads = [torch.randn_like(p) for p in model.parameters()]
    exchange.average(names, [g.clone() for g in grads])  # first step: allocations, warm starts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            exchange.average(names, [g.clone() for g in grads])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert exchange.step == 4 and exchange.nonfinite_steps == 0
