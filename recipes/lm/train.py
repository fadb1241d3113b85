"""The lm task: random byte windows for training, fixed windows for validation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from gradlane.errors import ConfigError
from gradlane.recipe import Task, WorkerContext

from .data import eval_batches, load_corpus, random_batch
from .model import GPT


def next_byte_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy (nats) of predicting batch[:, 1:] from batch[:, :-1]."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


class LMTask(Task):
    def __init__(self, cfg: DictConfig, ctx: WorkerContext):
        if cfg.data.batch_size < 1:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size!r} must be >= 1")
        try:
            self.model = GPT(**cfg.model)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
        self.corpus = load_corpus(cfg.data.max_bytes, cfg.data.val_every)
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
