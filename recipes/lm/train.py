"""The lm task: random byte windows for training, fixed windows for validation."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from gradlane.errors import ConfigError
from gradlane.recipe import Task, WorkerContext

from .data import eval_batches, load_corpus, random_batch
from .model import GPT, next_byte_loss


class LMTask(Task):
    def __init__(self, cfg: DictConfig, ctx: WorkerContext):
        for key in ("batch_size", "eval_batches"):
            if cfg.data[key] < 1:
                raise ConfigError(f"data.{key}={cfg.data[key]!r} must be >= 1")
        try:
            self.model = GPT(**cfg.model)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
        try:
            self.corpus = load_corpus(cfg.data.max_bytes, cfg.data.val_every)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        shortest = min(self.corpus.train.numel(), self.corpus.val.numel())
        if shortest <= cfg.model.context + 1:
            raise ConfigError(
                f"data.max_bytes={cfg.data.max_bytes}: {shortest} bytes of train or validation "
                f"text cannot hold one window of model.context + 1 = {cfg.model.context + 1}"
            )
        self.ctx = ctx
        self.batch_size = cfg.data.batch_size
        self.length = cfg.model.context + 1
        self.eval_batches = cfg.data.eval_batches

    def batch(self, step: int) -> torch.Tensor:
        gen = self.ctx.generator(step)
        return random_batch(self.corpus.train, self.batch_size, self.length, gen).to(
            self.ctx.device
        )

    def loss(self, model, batch):
        return next_byte_loss(model, batch)

    def samples(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)  # tokens

    def evaluate(self, model) -> dict[str, float]:
        losses = [
            next_byte_loss(model, b.to(self.ctx.device)).item()
            for b in eval_batches(self.corpus.val, self.batch_size, self.length, self.eval_batches)
        ]
        loss = sum(losses) / len(losses)
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def build(cfg: DictConfig, ctx: WorkerContext) -> LMTask:
    return LMTask(cfg, ctx)
