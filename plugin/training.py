"""The loop every Ray Train worker runs: recipe task, engine (DDP, DeepSpeed or Horovod
with the comm hook and the optimizer, see `gradlane.engines`).

Checkpoints (every `trainer.checkpoint_every` steps and at the end) go through
`ray.train.report` into one directory per step: `model.pt` from rank 0 and
`rank<r>.pt` from every rank (optimizer, hook state and RNG states, which
differ per rank: error-feedback residuals, a sharded optimizer window), and
the engine's own files (DeepSpeed's `engine.save_checkpoint`). Batches
are a pure function of (seed, step, rank), so a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .engines import build_engine, weight_spread
from .evaluation import evaluate
from .recipe import WorkerContext

MODEL_FILE = "model.pt"
PROGRESS_NAMESPACE = "gradlane"  # Ray namespace of the driver's progress actor
FAULT_MARKER = ".fault_injected"


class InjectedFault(RuntimeError):
    """Raised once by `debug.fail_at_step`, to exercise restart-and-resume."""


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, rank: int, step: int, engine) -> None:
    """Write this rank's share of the checkpoint of the state after `step` steps."""
    if rank == 0:
        torch.save({"step": step, "model": engine.module.state_dict()}, directory / MODEL_FILE)
    engine.save(directory)
    torch.save(
        {"step": step, **engine.state_dict(), "rng": _rng_state()}, directory / f"rank{rank}.pt"
    )


def load_checkpoint(directory: Path, rank: int, engine) -> int:
    """Restore model, engine (optimizer, schedule, hook) and RNG; return the step to start from."""
    own = directory / f"rank{rank}.pt"
    shared = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=False)
    mine = torch.load(own, map_location="cpu", weights_only=False)
    engine.module.load_state_dict(shared["model"])
    engine.load(directory)
    engine.load_state_dict(mine)
    _set_rng_state(mine["rng"])
    return int(shared["step"])


def _mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not values or not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


def _maybe_fail(cfg: DictConfig, step: int, rank: int, run_dir: Path) -> None:
    if step != cfg.debug.fail_at_step or rank != cfg.debug.fail_rank:
        return
    marker = run_dir / FAULT_MARKER
    if not marker.exists():
        marker.write_text(f"failed at step {step} on rank {rank}\n")
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
    model = task.model.to(device)
    engine = build_engine(cfg, model, device)
    ctx.seed_globals()  # per-rank dropout and sampling from here on

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = load_checkpoint(Path(d), rank, engine)
    elif config.get("resume_from"):
        start = load_checkpoint(Path(config["resume_from"]), rank, engine)

    progress = (
        ray.get_actor(config["progress_actor"], namespace=PROGRESS_NAMESPACE) if rank == 0 else None
    )
    if progress is not None and start:
        progress.push.remote({"step": start, "resumed_from": start})
    samples_total, clock = 0, time.perf_counter()
    for step in range(start, cfg.run.steps):
        _maybe_fail(cfg, step, rank, Path(config["run_dir"]))
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
            record |= engine.metrics()
        if done % cfg.run.eval_every == 0 or done == cfg.run.steps:
            record |= {f"val/{k}": v for k, v in evaluate(task, model, device).items()}
            record["ranks/weight_spread"] = weight_spread(model, device)
        if progress is not None and record:
            progress.push.remote({"step": done, **record})

        if (cfg.trainer.checkpoint_every and done % cfg.trainer.checkpoint_every == 0) or (
            done == cfg.run.steps
        ):
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), rank, done, engine)
                ray.train.report(
                    {"step": done, **record},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_{done:08d}",
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


def load_model_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in a gradlane checkpoint directory."""
    return torch.load(Path(checkpoint_dir) / MODEL_FILE, map_location="cpu", weights_only=False)[
        "model"
    ]
