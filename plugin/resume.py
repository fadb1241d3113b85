"""Resuming a run and branching from a checkpoint, checked before anything starts.

`resume=RUN_DIR|CHECKPOINT_DIR` continues a run: its original `config.yaml`
is never rewritten; each resume's changes are kept beside it as
`resume-<attempt>.yaml` and merged over it in order on the next resume. Changes
the checkpoint cannot take (a model shape, the optimizer or the comm hook, the
number of workers, a `run.steps` not past the checkpoint) are refused.
`init_from=RUN_DIR|CHECKPOINT_DIR` starts a new run from a checkpoint's
weights alone (step 0, a fresh optimizer). A run directory stands for its
newest intact checkpoint; broken newer ones are named in a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .errors import ConfigError
from .runs import RUN_FILE, RUN_POINTER, storage_dir

FIXED_ON_RESUME = ("optimizer.name", "comm.hook", "run.recipe")


def find_checkpoint(key: str, path: str) -> tuple[Path, Path]:
    """(run dir, intact checkpoint dir) for `key=path`, a run or a checkpoint directory."""
    p = Path(path).expanduser().resolve()
    if p.name.startswith(ckpt.PREFIX):
        run_dir = next((a for a in p.parents if (a / RUN_FILE).exists()), None)
        pointer = p.parent.parent / RUN_POINTER  # a checkpoint in run.storage
        if run_dir is None and pointer.exists():
            run_dir = Path(pointer.read_text().strip())
        if run_dir is None:
            raise ConfigError(f"{key}={path!r}: checkpoint is not inside a gradlane run directory")
        why = ckpt.problem(p)
        if why is not None:
            raise ConfigError(f"{key}={path!r} is not an intact checkpoint: {why}")
        return run_dir, p
    if not (p / RUN_FILE).exists():
        raise ConfigError(f"{key}={path!r} is neither a gradlane run nor a checkpoint directory")
    checkpoint = ckpt.latest_intact(storage_dir(p))
    if checkpoint is None:
        raise ConfigError(f"{key}={path!r}: the run has no intact checkpoint")
    return p, checkpoint


def _resume_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("resume-*.yaml"), key=lambda p: int(p.stem.split("-")[1]))


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's effective config: `config.yaml` with every `resume-<n>.yaml` merged over it."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    for changes in _resume_files(run_dir):
        cfg = OmegaConf.merge(cfg, OmegaConf.load(changes))
    return OmegaConf.to_container(cfg)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def changes(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> new value for every key where `cfg` differs from the saved config."""
    old, new = _flat(saved_config(run_dir)), _flat(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in new.items() if k != "resume" and old.get(k, object()) != v}


def record_resume(run_dir: Path, attempt: int, cfg: DictConfig) -> None:
    """Write this resume's changes as `resume-<attempt>.yaml` (nothing when none)."""
    diff = changes(run_dir, cfg)
    if diff:
        node = OmegaConf.create()
        for key, value in diff.items():
            OmegaConf.update(node, key, value, force_add=True)
        (run_dir / f"resume-{attempt}.yaml").write_text(OmegaConf.to_yaml(node))


def check_resume(cfg: DictConfig, run_dir: Path, checkpoint: Path) -> None:
    """Refuse changes the checkpoint cannot take; `run.steps` must pass its step."""
    diff = changes(run_dir, cfg)
    for key in FIXED_ON_RESUME:
        if key in diff:
            old = _flat(saved_config(run_dir))[key]
            raise ConfigError(
                f"{key}={diff[key]!r}: the run was trained with {key}={old!r}; a resumed run "
                f"keeps it (use init_from={run_dir} to branch with another)"
            )
    step = ckpt.checkpoint_step(checkpoint)
    if cfg.run.steps <= step:
        raise ConfigError(
            f"run.steps={cfg.run.steps} is not above the checkpoint's step {step} "
            f"({checkpoint}): give run.steps greater than {step} to train on"
        )
    written = ckpt.world_size(checkpoint)
    if written != cfg.trainer.num_workers:
        raise ConfigError(
            f"trainer.num_workers={cfg.trainer.num_workers}: checkpoint {checkpoint} was "
            f"written by {written} workers; resume with trainer.num_workers={written}"
        )


def check_shapes(key: str, model, checkpoint: Path) -> None:
    """The model built from the config has exactly the checkpoint's tensors and shapes."""
    import torch

    saved = torch.load(
        checkpoint / ckpt.MODEL_FILE, map_location="cpu", weights_only=False, mmap=True
    )["model"]
    built = model.state_dict()
    for name in [*built, *(k for k in saved if k not in built)]:  # the model's own order
        if name not in saved or name not in built:
            where = "the checkpoint" if name not in saved else "the model this config builds"
            raise ConfigError(
                f"{key}={checkpoint}: {name!r} is missing from {where}; the model.* settings "
                "must describe the checkpoint's model"
            )
        if tuple(saved[name].shape) != tuple(built[name].shape):
            raise ConfigError(
                f"{key}={checkpoint}: {name!r} has shape {tuple(saved[name].shape)} there but "
                f"{tuple(built[name].shape)} from this config; the model.* settings must "
                "describe the checkpoint's model"
            )
