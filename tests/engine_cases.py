"""What the DeepSpeed and Horovod tests share: a small model, per-rank data, the
compression settings, and the DDP-hook run every engine must reproduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 8
LR = 0.05

# Settings under which a compressor sends the gradient exactly: the result must match
# plain all-reduce (Horovod's own DistributedOptimizer, or DeepSpeed's all-reduce).
LOSSLESS = {
    "none": {"hook": "none"},
    "powersgd": {"hook": "powersgd", "rank": 16, "min_compression_rate": 0.0, "start_iter": 0},
    "topk": {"hook": "topk", "density": 1.0, "start_iter": 0},
    "qsgd": {"hook": "qsgd", "bits": 32, "start_iter": 0},
    "lgreco": {"hook": "lgreco", "compressor": "powersgd", "rank": 16, "candidates": "16,32",
               "min_compression_rate": 0.0, "start_iter": 1, "adjust_every": 3,
               "accumulate": 1},
}  # fmt: skip
# Lossy settings: the result must match the same compressor as a DDP comm hook (the same
# math over torch.distributed), and training must still make progress.
LOSSY = {
    "fp16": {"hook": "fp16"},
    "bf16": {"hook": "bf16"},
    "powersgd": {"hook": "powersgd", "rank": 1, "start_iter": 2},
    "topk": {"hook": "topk", "density": 0.2, "start_iter": 2},
    "qsgd": {"hook": "qsgd", "bits": 2, "bucket_size": 16, "start_iter": 2},
    "lgreco": {"hook": "lgreco", "compressor": "powersgd", "rank": 2, "start_iter": 2,
               "adjust_every": 3, "accumulate": 1},
}  # fmt: skip


def net() -> nn.Module:
    """The same initial weights on every rank and in every run."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 12, generator=gen)
    return x, torch.stack([x[:, :4].sum(1), x[:, 4:8].sum(1), x[:, 8:].sum(1)], 1)


def loss_of(model, b) -> torch.Tensor:
    return F.mse_loss(model(b[0]).float(), b[1])


def held_out(model: nn.Module) -> float:
    """Loss on a batch no rank trains on."""
    with torch.no_grad():
        return loss_of(model, batch(-1, 10_000)).item()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def ddp_reference(rank: int, cfg: dict) -> dict:
    """Weights, losses and bytes after STEPS of SGD with `cfg` as a DDP comm hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradlane.comm import register_comm_hook

    model = net()
    ddp = DDP(model)
    hook = register_comm_hook(ddp, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(ddp, batch(rank, step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"params": flat(model), "losses": losses, "metrics": hook.metrics()}
