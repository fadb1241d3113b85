"""The lm task: random byte windows for training, fixed windows for validation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from gradlane.errors import ConfigError
from gradlane.recipe import EvalSums, Task, WorkerContext

from .data import eval_windows, load_corpus, random_batch
from .model import GPT, next_byte_loss


class LMTask(Task):
    def __init__(self, cfg: DictConfig, ctx: WorkerContext):
        self.model = GPT(**cfg.model)
        self.corpus = load_corpus(cfg.data.max_bytes, cfg.data.val_every)
        shortest = min(self.corpus.train.numel(), self.corpus.val.numel())
        if shortest <= cfg.model.context + 1:
            raise ConfigError(
                f"data.max_bytes={cfg.data.max_bytes}: {shortest} bytes of train or validation "
                f"text cannot hold one window of model.context + 1 = {cfg.model.context + 1}"
            )
        self.ctx = ctx
        self.batch_size = cfg.data.batch_size
        self.length = cfg.model.context + 1
        self.eval_count = cfg.data.batch_size * cfg.data.eval_batches

    def batch(self, step: int) -> torch.Tensor:
        gen = self.ctx.generator(step)
        return random_batch(self.corpus.train, self.batch_size, self.length, gen).to(
            self.ctx.device
        )

    def loss(self, model, batch):
        return next_byte_loss(model, batch)

    def samples(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)  # tokens

    def evaluate(self, model) -> EvalSums:
        """Summed next-byte loss (nats and bits) over this rank's validation windows."""
        windows = eval_windows(self.corpus.val, self.length, self.eval_count)
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        tokens = 0
        for batch in windows[self.ctx.shard(self.eval_count)].split(self.batch_size):
            batch = batch.to(self.ctx.device)
            logits = model(batch[:, :-1])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            tokens += batch[:, 1:].numel()
        return {"loss": (total, tokens), "bits_per_byte": (total / math.log(2), tokens)}


def build(cfg: DictConfig, ctx: WorkerContext) -> LMTask:
    return LMTask(cfg, ctx)
