"""The vision task: ResNet on digits, optionally a hypernetwork over the label smoothing.

With `model.hyper` = mip (or default, the plain parametrisation, for comparison)
the parameters named by `model.hyper_params` come from a hypernetwork whose
input s in [0, 1] sets the label smoothing to s * `model.max_smoothing`. Each
batch draws its own s, so one run learns every setting; validation reports
accuracy, NLL and confidence at each of `model.eval_settings`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from gradlane.errors import ConfigError
from gradlane.layers import Hypernetized, hypernetize
from gradlane.recipe import EvalSums, Task, WorkerContext

from .data import load_digits, random_batch
from .model import build_resnet


def _model(cfg: DictConfig, world_size: int, device: torch.device) -> nn.Module:
    m = cfg.model
    if m.norm == "syncbatchnorm" and world_size > 1 and device.type == "cpu":
        raise ConfigError(
            "model.norm='syncbatchnorm' needs GPU workers (torch's SyncBatchNorm has no CPU "
            "kernels); on CPU use batchnorm, evonorm_b0 or evonorm_s0"
        )
    model = build_resnet(m.norm, width=m.width, blocks=m.blocks)
    if m.hyper == "none":
        return model
    try:
        return hypernetize(
            model,
            list(m.hyper_params),
            inputs={"smoothing": 1},
            hidden=list(m.hyper_hidden),
            encoding="mip" if m.hyper == "mip" else "none",
            residual=m.hyper == "mip",
        )
    except ValueError as exc:
        raise ConfigError(f"model.hyper_params: {exc}") from exc


class VisionTask(Task):
    def __init__(self, cfg: DictConfig, ctx: WorkerContext):
        self.settings = [float(s) for s in cfg.model.eval_settings]
        self.data = load_digits(cfg.data.image_size, cfg.data.val_fraction)
        self.model = _model(cfg, ctx.world_size, ctx.device)
        self.hyper = isinstance(self.model, Hypernetized)
        self.ctx, self.batch_size = ctx, cfg.data.batch_size
        self.max_smoothing = float(cfg.model.max_smoothing)
        self.title = f"vision: norm={cfg.model.norm}, hyper={cfg.model.hyper}"
        self.smoothing = float(cfg.model.label_smoothing)

    def batch(self, step: int):
        """(images, labels) or, with a hypernetwork, (images, labels, s) with s ~ U[0, 1]."""
        gen = self.ctx.generator(step)
        x, y = random_batch(self.data, self.batch_size, gen)
        batch = (x.to(self.ctx.device), y.to(self.ctx.device))
        return (*batch, torch.rand((), generator=gen).item()) if self.hyper else batch

    def _logits(self, model: nn.Module, x: torch.Tensor, s: float | None) -> torch.Tensor:
        return model(x) if s is None else model(x, hyper=s)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, *rest = batch
        s = rest[0] if rest else None
        smoothing = self.smoothing if s is None else s * self.max_smoothing
        return F.cross_entropy(self._logits(model, x, s), y, label_smoothing=smoothing)

    @torch.no_grad()
    def _sums(self, model: nn.Module, s: float | None, part: slice) -> EvalSums:
        """Correct predictions, NLL and confidence summed over validation images `part`."""
        was_training = model.training
        model.eval()
        dev = self.ctx.device
        logits = self._logits(model, self.data.val_x[part].to(dev), s)
        model.train(was_training)
        y = self.data.val_y[part].to(dev)
        n = len(y)
        return {
            "acc": ((logits.argmax(-1) == y).sum(), n),
            "nll": (F.cross_entropy(logits, y, reduction="sum"), n),
            "conf": (logits.softmax(-1).max(-1).values.sum(), n),
        }

    def evaluate(self, model: nn.Module) -> EvalSums:
        part = self.ctx.shard(len(self.data.val_y))
        if not self.hyper:
            return self._sums(model, None, part)
        out = {}
        for s in self.settings:
            out |= {f"{k}_at_{s:g}": v for k, v in self._sums(model, s, part).items()}
        return out

    def _scores(self, model: nn.Module, s: float | None) -> dict[str, float]:
        """Means over the whole validation set, on this process alone (for artifacts)."""
        sums = self._sums(model, s, slice(None))
        return {k: float(total) / count for k, (total, count) in sums.items()}

    def save_artifacts(self, model: nn.Module, outdir: Path) -> None:
        """vision_eval.json and .png: validation scores over the hyper-input (or of the model)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = [i / 10 for i in range(11)] if self.hyper else [None]
        rows = [{"setting": s, **self._scores(model, s)} for s in grid]
        (outdir / "vision_eval.json").write_text(json.dumps(rows, indent=2))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [r["setting"] if self.hyper else self.smoothing for r in rows]
        for key in ("acc", "conf"):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=f"validation {key}")
        ax.set_xlabel(
            "hyper-input s (label smoothing s x max)" if self.hyper else "label smoothing"
        )
        ax.set_ylim(0, 1.02)
        ax.legend()
        ax.set_title(self.title)
        fig.tight_layout()
        fig.savefig(outdir / "vision_eval.png", dpi=120)
        plt.close(fig)


def build(cfg: DictConfig, ctx: WorkerContext) -> VisionTask:
    return VisionTask(cfg, ctx)
