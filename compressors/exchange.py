"""The engine-neutral entry point: compress, exchange and average named gradients.

    exchange = GradientExchange(model, PowerSGD(rank=16), collective)
    loss.backward()
    exchange.average(names, [p.grad for p in params])   # every rank, same order

`average` writes the mean over ranks of each gradient into it, in place. A step
may be split over several calls (the DDP hook makes one per bucket); the call
with `last=True` ends it. The first `start_iter` steps are plain all-reduces.
Everything (error feedback, warm starts, levels) is keyed by parameter name,
so it survives bucket rebuilds, unused parameters and checkpoints. A call
whose gradients are not finite on any rank falls back to a plain all-reduce
for that step and leaves the error feedback untouched.

The DDP comm hook (`gradlane.compressors.hook`) is this class run per bucket on
a comm thread; DeepSpeed and Horovod call `average` after backward with their
own `Collective`. With a `Controller`, L-GreCo re-chooses each layer's level
at the start of the steps it is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import Controller
from .base import Compressor, Level, Slot, stable_seed
from .collective import Collective, plain_mean


@dataclass
class StepStats:
    payload: int = 0  # bytes this rank handed to collectives
    sent: float = 0.0  # bytes on this rank's links (ring model, see collective.py)
    received: float = 0.0
    dense: int = 0  # bytes a plain all-reduce of the same gradients hands over
    nonfinite: bool = False
    residual: Tensor | float = 0.0  # sum ||e'||^2 over compressed layers
    energy: Tensor | float = 0.0  # sum ||M||^2 over the same layers


class GradientExchange:
    """Compressor, per-layer levels, error feedback, statistics and the collective.

    `collective` may be given later (set the attribute before the first step). The
    collective is used, never saved: `state_dict()` holds tensors and numbers only.
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: Compressor,
        collective: Collective | None = None,
        start_iter: int = 0,
        seed: int = 0,
        controller: Controller | None = None,
    ):
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter={start_iter!r} must be an integer >= 0")
        self.compressor = compressor
        self.collective = collective
        self.start_iter = start_iter
        self.seed = seed
        self.controller = controller
        self.shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        self.levels: dict[str, Level] = {n: compressor.default for n in self.shapes}
        self.errors: dict[str, Tensor] = {}
        self.step = 0
        self.nonfinite_steps = 0
        self._open = False
        self._stats = StepStats()
        self._last = StepStats()

    def average(
        self, names: list[str], grads: list[Tensor], buffer: Tensor | None = None, last: bool = True
    ) -> None:
        """Replace each gradient (of the parameter named alike) by its mean over ranks.

        `buffer`, when given, is one tensor all `grads` are views of (a DDP bucket):
        plain all-reduces then send it in one piece. The call with `last=True` ends
        the step; every rank must make the same calls in the same order."""
        comm = self.collective
        if not self._open:
            self._open = True
            self._begin_step(grads[0].device)
        before = (comm.payload, comm.sent, comm.received)
        bad = ~_total(grads).isfinite()
        if self.step < self.start_iter:
            self._observe(names, grads, bad)
            plain_mean(comm, grads, buffer)
        else:
            self._compress(names, grads, buffer, bad)
        self._stats.payload += comm.payload - before[0]
        self._stats.sent += comm.sent - before[1]
        self._stats.received += comm.received - before[2]
        self._stats.dense += sum(g.numel() * g.element_size() for g in grads)
        if last:
            self._end_step()

    def _compress(self, names: list[str], grads: list[Tensor], buffer: Tensor | None, bad: Tensor):
        rank = self.collective.rank
        slots = [
            Slot(n, g, self._m(n, g), self.levels[n], stable_seed(self.seed, rank, self.step, n))
            for n, g in zip(names, grads, strict=True)
        ]
        self._observe(names, [s.m for s in slots], bad)
        energy = _sq_norm(slots)
        if self.compressor.exchange(slots, self.collective, bad):
            for s in slots:
                self.errors[s.name] = s.m
            self._stats.residual += _sq_norm(slots)
            self._stats.energy += energy
        else:
            plain_mean(self.collective, grads, buffer)
            self._stats.nonfinite = True

    def _m(self, name: str, grad: Tensor) -> Tensor:
        """M = g + e in fp32, a fresh tensor the compressor may overwrite."""
        e = self.errors.get(name)
        if e is None:
            return grad.to(torch.float32, copy=True)
        return torch.add(grad, e.to(grad.device))

    def _end_step(self) -> None:
        self._last, self._stats = self._stats, StepStats()
        self.nonfinite_steps += self._last.nonfinite
        self.step += 1
        self._open = False

    def _begin_step(self, device: torch.device) -> None:
        """Before a step's first gradients: the controller decides here when it is due."""
        if self.controller is not None and self.controller.due(self.step):
            self.levels = self.controller.decide(self.shapes, self.levels, self.collective, device)

    def _observe(self, names: list[str], tensors: list[Tensor], bad: Tensor) -> None:
        """Hand each layer's M = g + e to the controller on the steps it measures."""
        if self.controller is not None and self.controller.accumulating(self.step):
            if not bad.item():
                for name, m in zip(names, tensors, strict=True):
                    self.controller.observe(name, m)

    def metrics(self) -> dict[str, float]:
        """The last step's bytes, compression ratio and relative compression error."""
        last = self._last
        out = {
            "comm/bytes_per_step": float(last.payload),
            "comm/dense_bytes_per_step": float(last.dense),
            "comm/compression_ratio": last.dense / last.payload if last.payload else 1.0,
            "comm/sent_bytes_per_step": last.sent,
            "comm/received_bytes_per_step": last.received,
            "comm/nonfinite_steps": float(self.nonfinite_steps),
        }
        if isinstance(last.energy, Tensor) and last.energy > 0:
            out["comm/relative_error"] = float(last.residual / last.energy)
        if self.controller is not None:
            levels = {f"comm/level/{n}": float(self.levels[n]) for n in self.compressed_layers()}
            out |= levels | {"comm/lgreco_decisions": float(self.controller.decisions)}
            out |= {f"comm/lgreco_{k}": v for k, v in self.controller.last.items()}
        return out

    def compressed_layers(self) -> list[str]:
        """Layers compressed at their current level (1-D tensors are not, for PowerSGD)."""
        return [n for n, s in self.shapes.items() if self.compressor.compresses(s, self.levels[n])]

    def save_artifacts(self, outdir: Path) -> None:
        """`comm_levels.png`: a bar chart of each compressed layer's level."""
        from matplotlib.figure import Figure

        names = self.compressed_layers()
        fig = Figure(figsize=(max(6.0, 0.22 * len(names)), 4.5), layout="constrained")
        ax = fig.subplots()
        ax.bar(range(len(names)), [self.levels[n] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel(f"{self.compressor.name} level")
        ax.set_title(f"{self.compressor.name} level per layer after {self.step} steps")
        Path(outdir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(outdir) / "comm_levels.png", dpi=120)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "levels": dict(self.levels),
            "errors": dict(self.errors),
            "compressor": self.compressor.state_dict(),
        }
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.levels.update(state["levels"])
        self.errors = dict(state["errors"])
        self.compressor.load_state_dict(state["compressor"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])


def _total(grads: list[Tensor]) -> Tensor:
    """sum of every entry in fp32: not finite when any entry is inf or nan (or the sum
    passes fp32's range, ~3e38, which no sane gradient reaches); cheaper than isfinite."""
    return torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()


def _sq_norm(slots: list[Slot]) -> Tensor:
    """sum ||m||^2 over the slots."""
    return torch.stack([torch.dot(s.m.view(-1), s.m.view(-1)) for s in slots]).sum()
