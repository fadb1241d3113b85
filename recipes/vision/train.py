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

from gradlane.errors import ConfigError, unknown
from gradlane.layers import Hypernetized, hypernetize
from gradlane.recipe import Task, WorkerContext

from .data import load_digits, random_batch
from .model import NORMS, build_resnet

HYPER = ("none", "mip", "default")


def _model(cfg: DictConfig, world_size: int, device: torch.device) -> nn.Module:
    m = cfg.model
    if m.norm not in NORMS:
        raise unknown("model.norm", m.norm, NORMS)
    if m.hyper not in HYPER:
        raise unknown("model.hyper", m.hyper, HYPER)
    if m.norm == "syncbatchnorm" and world_size > 1 and device.type == "cpu":
        raise ConfigError(
            "model.norm='syncbatchnorm' needs GPU workers (torch's SyncBatchNorm has no CPU "
            "kernels); on CPU use batchnorm, evonorm_b0 or evonorm_s0"
        )
    try:
        model = build_resnet(m.norm, width=m.width, blocks=m.blocks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if m.hyper == "none":
        return model
    patterns = m.hyper_params if isinstance(m.hyper_params, str) else list(m.hyper_params)
    try:
        return hypernetize(
            model,
            patterns,
            inputs={"smoothing": 1},
            hidden=list(m.hyper_hidden),
            encoding="mip" if m.hyper == "mip" else "none",
            residual=m.hyper == "mip",
        )
    except ValueError as exc:
        raise ConfigError(f"model.hyper_params: {exc}") from exc


class VisionTask(Task):
    def __init__(self, cfg: DictConfig, ctx: WorkerContext):
        if cfg.data.batch_size < 1:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size!r} must be >= 1")
        self.settings = [float(s) for s in cfg.model.eval_settings]
        if cfg.model.hyper != "none" and not all(0.0 <= s <= 1.0 for s in self.settings):
            raise ConfigError(f"model.eval_settings={self.settings} must lie in [0, 1]")
        for key in ("max_smoothing", "label_smoothing"):
            if not 0.0 <= cfg.model[key] <= 1.0:
                raise ConfigError(f"model.{key}={cfg.model[key]!r} must be in [0, 1]")
        try:
            self.data = load_digits(cfg.data.image_size, cfg.data.val_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
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
    def _scores(self, model: nn.Module, s: float | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        dev = self.ctx.device
        logits = self._logits(model, self.data.val_x.to(dev), s)
        model.train(was_training)
        y = self.data.val_y.to(dev)
        prob = logits.softmax(-1)
        return {
            "acc": (logits.argmax(-1) == y).float().mean().item(),
            "nll": F.cross_entropy(logits, y).item(),
            "conf": prob.max(-1).values.mean().item(),
        }

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.hyper:
            return self._scores(model, None)
        out = {}
        for s in self.settings:
            out |= {f"{k}_at_{s:g}": v for k, v in self._scores(model, s).items()}
        return out

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
