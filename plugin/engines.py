"""How a Ray Train worker trains: `trainer.engine` = ddp, deepspeed or horovod.

An engine wraps the recipe's model and the registry's optimizer, runs one
training step (forward, backward, gradient exchange, optimizer and schedule),
and holds what a checkpoint needs from it; the loop in `gradlane.training`, the
recipes, checkpoints and tracking are the same for all three:

* ddp: `DistributedDataParallel` with the comm hook registered on it;
* deepspeed: `deepspeed.initialize` on the process group Ray Train set up, with
  the optimizer as a client optimizer; a comm hook replaces DeepSpeed's gradient
  all-reduce (ZeRO 0 only, see `gradlane.deepspeed`); checkpoints go through
  `engine.save_checkpoint`;
* horovod: Horovod started over the Ray Train workers (a Gloo rendezvous, see
  `gradlane.horovod.init_from_torch`) and `gradlane.horovod.DistributedOptimizer`
  with the comm hook's compressor.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gradlane.compressors import GradientExchange

from .errors import ConfigError

ENGINES = ("ddp", "deepspeed", "horovod")
DEEPSPEED_FILES = "deepspeed"  # sub-directory of a checkpoint with DeepSpeed's own files
DEEPSPEED_TAG = "state"


def optimizer_metrics(optimizer) -> dict[str, float]:
    """The user's optimizer's own numbers (M-FAC: skipped steps, error estimate), found
    beneath the engines' wrappers (Horovod's DistributedOptimizer, DeepSpeed's ZeRO)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    metrics = getattr(optimizer, "metrics", None)
    return metrics() if callable(metrics) else {}


class DDPEngine:
    """DistributedDataParallel with the configured comm hook; the interface of every engine.

    `module` is the bare model, `wrapped` what the task's loss runs through, `exchange`
    the hook's GradientExchange (None: the engine's own uncompressed all-reduce)."""

    name = "ddp"

    def __init__(self, cfg: DictConfig, model: nn.Module, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel as DDP

        from .comm import register_comm_hook
        from .optim import build_optimizer, build_scheduler

        self.module = model
        self.wrapped = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.trainer.bucket_cap_mb,
            find_unused_parameters=cfg.trainer.find_unused_parameters,
            gradient_as_bucket_view=cfg.trainer.gradient_as_bucket_view,
        )
        self.hook = register_comm_hook(self.wrapped, cfg.comm)
        self.exchange = self.hook.state if isinstance(self.hook.state, GradientExchange) else None
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters())
        self.scheduler = build_scheduler(cfg.optimizer, self.optimizer, cfg.run.steps)
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate of the last step

    def train_step(self, task, step: int) -> tuple[Tensor, int]:
        """One optimizer step on `task.batch(step)`: (the loss, detached; samples seen)."""
        self.wrapped.train()
        batch = task.batch(step)
        loss = task.loss(self.wrapped, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return loss.detach(), task.samples(batch)

    def metrics(self) -> dict[str, float]:
        return self.hook.metrics()

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of a checkpoint (beside the model weights in `model.pt`)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "hook": self.hook.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.hook.load_state_dict(state["hook"])

    def save(self, directory: Path) -> None:
        """Files of the engine's own checkpoint format (every rank calls it)."""

    def load(self, directory: Path) -> None:
        """Restore from `save`'s files, after the model weights were loaded."""

    def save_artifacts(self, outdir: Path) -> None:
        self.hook.save_artifacts(outdir)

    def close(self) -> None:
        """Release what the engine started (every rank, at the end of training)."""


class DeepSpeedEngine(DDPEngine):
    """`deepspeed.initialize` with the registry optimizer as client optimizer and the
    schedule as its LR scheduler; `deepspeed.gradient_accumulation_steps` micro-batches
    (`task.batch(step * k + i)`) make one step; a comm hook replaces the all-reduce."""

    name = "deepspeed"

    def __init__(self, cfg: DictConfig, model: nn.Module, device: torch.device):
        import deepspeed

        from .deepspeed import Compression, build

        self.module = model
        self.accumulate = cfg.deepspeed.gradient_accumulation_steps
        self.stage = cfg.deepspeed.zero_stage
        args = build(cfg, model)
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(**args)
        self.compression = Compression(self.wrapped, cfg.comm)
        self.exchange = self.compression.exchange
        self.lr = self.wrapped.get_lr()[0]

    def train_step(self, task, step: int) -> tuple[Tensor, int]:
        self.wrapped.train()
        losses, samples = [], 0
        for i in range(self.accumulate):
            batch = task.batch(step * self.accumulate + i)
            loss = task.loss(self.wrapped, batch)
            self.wrapped.backward(loss)
            if self.wrapped.is_gradient_accumulation_boundary():
                self.compression.average()
            self.lr = self.wrapped.get_lr()[0]
            self.wrapped.step()
            losses.append(loss.detach().float())
            samples += task.samples(batch)
        _broadcast_buffers(self.module)
        return torch.stack(losses).mean(), samples

    def metrics(self) -> dict[str, float]:
        return self.compression.metrics()

    def state_dict(self) -> dict[str, Any]:
        """The exchange's state; at ZeRO 0 also the optimizer's, which DeepSpeed saves only
        from rank 0 although it may differ per rank (M-FAC's sliced window)."""
        state = {"hook": self.compression.state_dict()}
        if self.stage == 0:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compression.load_state_dict(state["hook"])
        if self.stage == 0:
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self, directory: Path) -> None:
        self.wrapped.save_checkpoint(str(directory / DEEPSPEED_FILES), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.wrapped.load_checkpoint(
            str(directory / DEEPSPEED_FILES),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=self.stage > 0,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory / DEEPSPEED_FILES}")

    def save_artifacts(self, outdir: Path) -> None:
        self.compression.save_artifacts(outdir)


class HorovodEngine(DDPEngine):
    """Horovod over the Ray Train workers' processes, with gradlane's DistributedOptimizer."""

    name = "horovod"

    def __init__(self, cfg: DictConfig, model: nn.Module, device: torch.device):
        import horovod.torch as hvd

        from .horovod import DistributedOptimizer, init_from_torch
        from .optim import build_optimizer, build_scheduler

        init_from_torch()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.module = self.wrapped = model
        settings = OmegaConf.to_container(cfg.comm, resolve=True)
        compression = settings.pop("hook", "none")
        inner = build_optimizer(cfg.optimizer, model.parameters())
        self.optimizer = DistributedOptimizer(
            inner, model.named_parameters(), compression, **settings
        )
        self.hook = self.optimizer  # its state_dict holds the exchange's
        self.exchange = self.optimizer.exchange
        self.scheduler = build_scheduler(cfg.optimizer, self.optimizer, cfg.run.steps)
        self.lr = self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def train_step(self, task, step: int) -> tuple[Tensor, int]:
        out = super().train_step(task, step)
        _broadcast_buffers(self.module)
        return out

    def close(self) -> None:
        from .horovod import shutdown

        shutdown()


def build_engine(cfg: DictConfig, model: nn.Module, device: torch.device) -> DDPEngine:
    """The engine `trainer.engine` names, around `model` (already on `device`)."""
    kinds = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine, "horovod": HorovodEngine}
    return kinds[cfg.trainer.engine](cfg, model, device)


def weight_spread(module: nn.Module, device: torch.device) -> float:
    """max over ranks of |f_r - f_0|_1 with f = (sum w, sum w^2) over all weights (float64):
    0 exactly when every rank holds the same model, as data-parallel training must."""
    if not dist.is_initialized():
        return 0.0
    ws = [p.detach().double() for p in module.parameters()]
    mine = torch.stack([sum(w.sum() for w in ws), sum(w.square().sum() for w in ws)]).to(device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return float(max((r - rows[0]).abs().sum() for r in rows))


def _broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, as DDP does at each forward."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def check_engine(cfg: DictConfig) -> None:
    """Rules across sections: the engine is installed, its settings fit the hook and device."""
    from .comm import DDP_ONLY_HOOKS
    from .config import DeepSpeedSection

    engine, hook = cfg.trainer.engine, cfg.comm.get("hook", "none")
    defaults = DeepSpeedSection()
    changed = [k for k in cfg.deepspeed if cfg.deepspeed[k] != getattr(defaults, k)]
    if engine != "deepspeed" and changed:
        key = changed[0]
        raise ConfigError(
            f"deepspeed.{key}={cfg.deepspeed[key]!r} needs trainer.engine=deepspeed "
            f"(trainer.engine={engine!r})"
        )
    if engine == "ddp":
        return
    if importlib.util.find_spec(engine) is None:
        how = "make horovod" if engine == "horovod" else "pip install 'gradlane[deepspeed]'"
        raise ConfigError(f"trainer.engine={engine!r}: {engine} is not installed ({how})")
    if hook in DDP_ONLY_HOOKS:
        raise ConfigError(
            f"comm.hook={hook!r} is torch's DDP-only hook; under trainer.engine={engine!r} "
            "use one of gradlane's (fp16, bf16, powersgd, topk, qsgd, lgreco)"
        )
    if engine == "deepspeed":
        from .deepspeed import check_config

        check_config(cfg)
