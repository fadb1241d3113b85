"""The loop every Ray Train worker runs: recipe task, engine (DDP, DeepSpeed or Horovod
with the comm hook and the optimizer, see `gradlane.engines`).

Checkpoints (every `trainer.checkpoint_every` steps and at the end) go through
`ray.train.report` into one directory per step (files: `gradlane.checkpoint`,
plus the engine's own, e.g. DeepSpeed's `engine.save_checkpoint`). Batches are
a pure function of (seed, step, rank), so a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .engines import build_engine, optimizer_metrics, weight_spread
from .evaluation import evaluate
from .recipe import WorkerContext

PROGRESS_NAMESPACE = "gradlane"  # Ray namespace of the driver's progress actor
FAULT_MARKER = ".fault_injected"


class InjectedFault(RuntimeError):
    """Raised once by `debug.fail_at_step`, to exercise restart-and-resume."""


def _mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not values or not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


def _maybe_fail(cfg: DictConfig, step: int, rank: int, storage: Path) -> None:
    if step != cfg.debug.fail_at_step or rank != cfg.debug.fail_rank:
        return
    marker = storage / FAULT_MARKER  # in run.storage: every node sees it
    if not marker.exists():
        marker.write_text(f"failed at step {step} on rank {rank}\n")
        if cfg.debug.fail_with == "sigkill":  # dies at once: no exception, no clean-up
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"debug.fail_at_step={step}: injected failure on rank {rank}")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import ray
    import ray.train
    import ray.train.torch

    from gradlane.recipes import RECIPES

    cfg = OmegaConf.create(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.trainer.cpus_per_worker)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank

    recipe = RECIPES.get(cfg.run.recipe)
    ctx = WorkerContext(rank, world, device, cfg.run.seed)
    task = recipe.build(cfg, ctx)
    if config.get("init_from"):  # a branch: the weights only, from step 0
        task.model.load_state_dict(ckpt.load_model_weights(Path(config["init_from"])))
    model = task.model.to(device)
    engine = build_engine(cfg, model, device)
    ctx.seed_globals()  # per-rank dropout and sampling from here on

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = ckpt.load(Path(d), rank, engine)
    elif config.get("resume_from"):
        start = ckpt.load(Path(config["resume_from"]), rank, engine)

    progress = (
        ray.get_actor(config["progress_actor"], namespace=PROGRESS_NAMESPACE) if rank == 0 else None
    )
    if progress is not None:  # where the workers live: a sweep frees it if Tune stops the run
        group = ray.get_runtime_context().get_placement_group_id()
        progress.push.remote({"step": start, "placement_group": group})
    if progress is not None and start:
        progress.push.remote({"step": start, "resumed_from": start})
    samples_total, clock = 0, time.perf_counter()
    for step in range(start, cfg.run.steps):
        _maybe_fail(cfg, step, rank, Path(config["storage"]))
        time.sleep(cfg.debug.step_delay_s)
        t0 = time.perf_counter()
        loss, samples = engine.train_step(task, step)
        step_time = time.perf_counter() - t0
        samples_total += samples * world
        done = step + 1

        record: dict[str, float] = {}
        if done % cfg.run.log_every == 0 or done == cfg.run.steps:
            record = _mean_across_ranks(
                {"train/loss": loss.item(), "step_time_s": step_time}, device
            )
            elapsed = time.perf_counter() - clock
            record |= {"lr": engine.lr, "samples_per_s": samples_total / max(elapsed, 1e-9)}
            record |= engine.metrics() | optimizer_metrics(engine.optimizer)
        if done % cfg.run.eval_every == 0 or done == cfg.run.steps:
            record |= {f"val/{k}": v for k, v in evaluate(task, model, device).items()}
            record["ranks/weight_spread"] = weight_spread(model, device)
        if progress is not None and record:
            progress.push.remote({"step": done, **record})

        if (cfg.trainer.checkpoint_every and done % cfg.trainer.checkpoint_every == 0) or (
            done == cfg.run.steps
        ):
            with tempfile.TemporaryDirectory() as tmp:
                ckpt.save(Path(tmp), rank, done, engine)
                ray.train.report(
                    {"step": done, **record},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=ckpt.checkpoint_name(done),
                )

    if rank == 0:
        _send_artifacts(task, model, engine, progress)
    engine.close()


def _send_artifacts(task, model, engine, progress) -> None:
    """Rank 0 writes plots/images and hands their bytes to the driver (any node)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        task.save_artifacts(model, out)
        engine.save_artifacts(out)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    if files and progress is not None:
        import ray

        ray.get(progress.add_artifacts.remote(files))
