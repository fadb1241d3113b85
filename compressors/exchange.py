"""The engine-neutral entry point: compress, exchange and average named gradients.

    exchange = GradientExchange(model, PowerSGD(rank=16), collective)
    loss.backward()
    exchange.average(names, [p.grad for p in params])   # every rank, same order

`average` writes the mean over ranks of each gradient into it, in place. A step
may be split over several calls (the DDP hook makes one per bucket); the call
with `last=True` ends it. The first `start_iter` steps are plain all-reduces.
Everything (error feedback, warm starts, levels) is keyed by parameter name,
so it survives bucket rebuilds, unused parameters and checkpoints.

Per call: one fused pass takes every gradient's norm (health flags, see
`base.py`, and the metrics' denominator); M = g + e goes into one fp32 buffer
ordered by (level, shape), so same-shape layers lie back to back and the
codecs batch them; the codec exchanges; each residual is stored, or the old one
kept where `base.outcome` says so. Nothing reads a GPU value on the way: flags,
counts and the error metrics stay on the device until `metrics()` asks.

Loss scaling: set `grad_scaler` to the `torch.amp.GradScaler` that scales the
loss. Gradients then arrive multiplied by its current scale s; residuals are
kept unscaled (e / s) and rescaled by the scale of the step that uses them,
M = g + s e, so a scale change never misweighs them. The scaler skips a step
whose gradients are not all finite, so such a step's residual updates are all
undone at its end (without a scaler only the non-finite layer keeps its
residual: the others' updates are applied).

A call that raises stops the exchange: every later call raises at once, without
a collective, so no rank goes on out of step with the others (build a new one,
or load a checkpoint into it). The DDP comm hook (`hook.py`) runs this per
bucket on a comm thread; DeepSpeed and Horovod call `average` after backward
with their own `Collective`. With a `Controller`, L-GreCo re-chooses each
layer's level at the start of the steps it is due.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import Controller
from .base import (
    Compressor,
    Level,
    Slot,
    health,
    host_reads_free,
    norms64,
    outcome,
    square_norm,
    stable_seed,
)
from .collective import Collective, plain_mean


@dataclass
class StepStats:
    payload: int = 0  # bytes this rank handed to collectives
    sent: float = 0.0  # bytes on this rank's links (ring model, see collective.py)
    received: float = 0.0
    dense: int = 0  # bytes a plain all-reduce of the same gradients hands over
    compressed: list[Tensor] = field(default_factory=list)  # sum ||g||^2 per call, compressed
    nonfinite: list[Tensor] = field(default_factory=list)  # any layer poisoned, per call
    scale: Tensor | None = None  # the loss scale of the step


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
        self.grad_scaler: Any = None  # a torch.amp.GradScaler, when the loss is scaled
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = {n: p.shape for n, p in params}
        self.dtypes = {n: p.dtype for n, p in params}
        self.levels: dict[str, Level] = {n: compressor.default for n in self.shapes}
        self.errors: dict[str, Tensor] = {}  # unscaled residual per layer
        self.step = 0
        self._nonfinite_steps: Tensor | int = 0
        self._failed: BaseException | None = None
        self._step_old: dict[str, Tensor | None] = {}  # with a grad scaler: to undo a step
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
        self.check_alive()
        try:
            self._average(names, grads, buffer, last)
        except BaseException as exc:
            self._failed = exc
            raise

    def check_alive(self) -> None:
        """Raise if an earlier call failed (the ranks may be out of step since)."""
        if self._failed is not None:
            raise RuntimeError(
                f"gradient exchange stopped at step {self.step}: an earlier call failed "
                f"({type(self._failed).__name__}: {self._failed}); build a new one or load "
                "a checkpoint"
            ) from self._failed

    def _average(self, names: list[str], grads: list[Tensor], buffer: Tensor | None, last: bool):
        comm = self.collective
        if not self._open:
            self._open = True
            self._stats.scale = self._loss_scale()
            self._begin_step(grads[0].device)
        before = (comm.payload, comm.sent, comm.received)
        norms = norms64(grads)
        if self.step < self.start_iter:
            self._observe(names, grads, torch.stack(norms))
            plain_mean(comm, grads, buffer)
        else:
            passing = [self.compressor.passes(g.dtype) for g in grads]
            if any(passing):  # the buffer goes whole only when every gradient in it passes
                whole = buffer if all(passing) else None
                plain_mean(comm, [g for g, p in zip(grads, passing, strict=True) if p], whole)
            rest = [i for i, p in enumerate(passing) if not p]
            if rest:
                pick = [names[i] for i in rest], [grads[i] for i in rest], [norms[i] for i in rest]
                self._compress(*pick)
        self._stats.payload += comm.payload - before[0]
        self._stats.sent += comm.sent - before[1]
        self._stats.received += comm.received - before[2]
        self._stats.dense += sum(g.numel() * g.element_size() for g in grads)
        if last:
            self._end_step()

    def _compress(self, names: list[str], grads: list[Tensor], norms: list[Tensor]) -> None:
        comm, scale = self.collective, self._stats.scale
        order = sorted(
            range(len(names)), key=lambda i: (repr(self.levels[names[i]]), grads[i].shape)
        )
        flat = torch.empty(sum(g.numel() for g in grads), device=grads[0].device)
        slots, offset = [], 0
        for i in order:
            name, g = names[i], grads[i]
            m = flat[offset : offset + g.numel()].view(g.shape)
            offset += g.numel()
            e = self.errors.get(name)
            if e is None:
                m.copy_(g)
            elif scale is None:
                torch.add(g, e, out=m)
            else:
                torch.addcmul(g, e, scale, out=m)
            seed = stable_seed(self.seed, comm.rank, self.step, name)
            slots.append(Slot(name, g, m, self.levels[name], seed))
        norms = torch.stack([norms[i] for i in order])  # no index tensor: nothing to copy
        self._observe([s.name for s in slots], [s.m for s in slots], norms)
        total = self.compressor.exchange(slots, comm, health(norms))
        _, keep = outcome(total, comm.world)
        for s, k in zip(slots, keep, strict=True):
            new = s.m if scale is None else s.m.div_(scale)
            old = self.errors.get(s.name)
            _keep_where(k, old, new)
            self.errors[s.name] = new
            if scale is not None:
                self._step_old.setdefault(s.name, old)
        self._stats.compressed.append(norms.square().sum())
        self._stats.nonfinite.append(total.isinf().any())

    def _loss_scale(self) -> Tensor | None:
        """The grad scaler's current scale (a one-element device tensor), if it scales."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)  # updated in place by scaler.update()
        return None if scale is None else scale.detach().clone()

    def _end_step(self) -> None:
        self._last, self._stats = self._stats, StepStats()
        if self._last.nonfinite:
            bad = torch.stack(self._last.nonfinite).any()
            self._nonfinite_steps = self._nonfinite_steps + bad
            for name, old in self._step_old.items():  # the scaler skips this step: undo it
                _keep_where(bad, old, self.errors[name])
        self._step_old.clear()
        self.step += 1
        self._open = False

    def _begin_step(self, device: torch.device) -> None:
        """Before a step's first gradients: the controller decides here when it is due."""
        if self.controller is not None and self.controller.due(self.step):
            self.levels = self.controller.decide(self.shapes, self.levels, self.collective, device)

    def _observe(self, names: list[str], tensors: list[Tensor], norms: Tensor) -> None:
        """Hand each layer's M = g + e and ||g||^2 (unscaled) to the controller on the
        steps it measures; non-finite gradients are left out."""
        if self.controller is None or not self.controller.accumulating(self.step):
            return
        scale = self._stats.scale
        ok = norms.isfinite()
        grad_sq = norms.square() if scale is None else (norms / scale).square()
        for i, (name, m) in enumerate(zip(names, tensors, strict=True)):
            e = self.errors.get(name)
            residual_sq = None if e is None else square_norm(e)
            m = m if scale is None else m / scale
            self.controller.observe(name, m, grad_sq[i], residual_sq, ok[i], e)

    @property
    def nonfinite_steps(self) -> int:
        """Steps in which some layer's gradient was not finite on some rank."""
        return int(self._nonfinite_steps)

    def metrics(self) -> dict[str, float]:
        """The last step's bytes and measured error; the controller's latest prediction.

        comm/relative_error is comm/residual_sq / comm/grad_sq, sum ||e'||^2 / sum ||g||^2
        over the compressed layers: what error feedback still owes after the step against
        the step's gradient (unscaled). Over a run, compare sums of the two."""
        last, world = self._last, self.collective.world if self.collective else 1
        out = {
            "comm/bytes_per_step": float(last.payload),
            "comm/dense_bytes_per_step": float(last.dense),
            "comm/compression_ratio": last.dense / last.payload if last.payload else 1.0,
            "comm/sent_bytes_per_step": last.sent,
            "comm/received_bytes_per_step": last.received,
            "comm/nonfinite_steps": float(self.nonfinite_steps),
            "comm/compressed_share": self.compressed_share(),
        }
        if world > 1 and last.sent:
            out["comm/traffic_ratio"] = 2 * (world - 1) / world * last.dense / last.sent
        if last.compressed and self.errors:
            energy = torch.stack(last.compressed).sum()
            if last.scale is not None:
                energy = energy / last.scale.square().sum()
            residual = torch.stack(torch._foreach_norm(list(self.errors.values()))).square().sum()
            out["comm/residual_sq"], out["comm/grad_sq"] = float(residual), float(energy)
            if energy > 0:
                out["comm/relative_error"] = out["comm/residual_sq"] / out["comm/grad_sq"]
        if self.controller is not None:
            levels = {f"comm/level/{n}": float(self.levels[n]) for n in self.compressed_layers()}
            out |= levels | {"comm/decisions": float(self.controller.decisions)}
            out |= {f"comm/predicted_{k}": v for k, v in self.controller.last.items()}
        return out

    def compressed_layers(self) -> list[str]:
        """Layers compressed at their current level (1-D tensors are not, for PowerSGD)."""
        left = self.uncompressed()
        return [n for n in self.shapes if n not in left]

    def uncompressed(self) -> dict[str, str]:
        """Layers sent as they are at their current level, each with the reason."""
        out = {}
        for n, shape in self.shapes.items():
            if self.compressor.passes(self.dtypes[n]):
                out[n] = f"{self.dtypes[n]} gradients are already 16-bit"
            elif not self.compressor.compresses(shape, self.levels[n]):
                out[n] = self.compressor.why_not(shape, self.levels[n])
        return out

    def compressed_share(self) -> float:
        """The fraction of gradient entries that go compressed at the current levels."""
        total = sum(s.numel() for s in self.shapes.values())
        return sum(self.shapes[n].numel() for n in self.compressed_layers()) / max(total, 1)

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
        self._nonfinite_steps = state["nonfinite_steps"]
        self.levels.update(state["levels"])
        self.errors = dict(state["errors"])
        self.compressor.load_state_dict(state["compressor"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])


def _keep_where(flag: Tensor, old: Tensor | None, new: Tensor) -> None:
    """new <- old (zero when None) where the bool tensor `flag` is true, in place."""
    if not _may_be_true(flag):
        return
    if old is None:
        new.masked_fill_(flag, 0.0)
    else:
        torch.where(flag, old, new, out=new)


def _may_be_true(flag: Tensor) -> bool:
    """Whether a bool tensor may hold True. A CPU tensor is read (free); a GPU one is
    assumed True, so the caller's on-device select runs and the host never waits."""
    return not host_reads_free(flag.device) or bool(flag)
