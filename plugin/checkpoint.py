"""Checkpoint files: what each rank writes, how a complete one is recognised, retention.

One directory per step (`checkpoint_<step:08d>`), assembled by Ray Train from
every rank's files:

    model.pt             rank 0: {"step", "model"}
    shared.pt            rank 0: the states that are equal on every rank (AdamW, the schedule)
    rank<r>.pt           rank r: its RNG states and the states that differ between ranks
                         (error-feedback residuals, a rank-sharded M-FAC window)
    manifest-rank<r>.json  rank r, written last: size and SHA-256 of each file it wrote
    (engine files)       e.g. deepspeed/: what the engine's own save wrote

Which states are equal is measured, not declared: every rank hashes each
state and the hashes are all-gathered, so N identical AdamW states become one
file. A checkpoint is intact when every rank's manifest is there and every
file matches it, so a copy cut short by a crash never looks complete. An
engine that saves through its own API (DeepSpeed's `save_checkpoint`) writes
its files into the same directory; each rank's manifest lists every file in
its own directory, so those are verified too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

MODEL_FILE = "model.pt"
SHARED_FILE = "shared.pt"
PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(directory: Path) -> int:
    """The step a checkpoint directory holds, from its name."""
    return int(Path(directory).name.removeprefix(PREFIX))


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


def _digest(obj: Any) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, rank: int, world: int, step: int, files: list[str]) -> None:
    """Record size and SHA-256 of `files` (written by `rank`), atomically, as the last write."""
    entries = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in files
    }
    tmp = directory / f".manifest-rank{rank}.tmp"
    record = {"step": step, "world_size": world, "files": entries}
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, directory / f"manifest-rank{rank}.json")


def save(directory: Path, rank: int, step: int, engine) -> None:
    """Write this rank's share of the checkpoint of the state after `step` steps into its
    own (empty) `directory`: the engine's states and files, RNG states, the manifest.

    `engine` (see `gradlane.engines`) gives `module`, `state_dict()` (name -> state:
    optimizer, scheduler, hook) and `save(directory)` for files of its own format. A
    collective when torch.distributed is initialised (the state hashes are all-gathered)."""
    states = engine.state_dict()
    mine = {name: _digest(state) for name, state in states.items()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    everyone = [mine] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    equal = {name for name in states if all(d.get(name) == mine[name] for d in everyone)}
    engine.save(directory)
    if rank == 0:
        torch.save({"step": step, "model": engine.module.state_dict()}, directory / MODEL_FILE)
        torch.save({k: v for k, v in states.items() if k in equal}, directory / SHARED_FILE)
    own = {k: v for k, v in states.items() if k not in equal}
    torch.save({"step": step, "rng": _rng_state(), **own}, directory / f"rank{rank}.pt")
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    write_manifest(directory, rank, world, step, files)


def load(directory: Path, rank: int, engine) -> int:
    """Restore model, engine (optimizer, schedule, hook, its own files) and RNG; return the
    step to start from."""
    directory = Path(directory)
    top = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=False)
    shared = torch.load(directory / SHARED_FILE, map_location="cpu", weights_only=False)
    mine = torch.load(directory / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    engine.module.load_state_dict(top["model"])
    engine.load(directory)
    engine.load_state_dict(
        {**shared, **{k: v for k, v in mine.items() if k not in ("step", "rng")}}
    )
    _set_rng_state(mine["rng"])
    return int(top["step"])


def load_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in a gradlane checkpoint directory."""
    path = Path(directory) / MODEL_FILE
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _manifest(directory: Path, rank: int) -> dict[str, Any] | None:
    try:
        return json.loads((directory / f"manifest-rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def world_size(directory: Path) -> int:
    """How many workers wrote the checkpoint in `directory` (0: no readable manifest)."""
    manifest = _manifest(Path(directory), 0)
    return int(manifest["world_size"]) if manifest else 0


def problem(directory: Path) -> str | None:
    """Why `directory` is not an intact checkpoint (None when it is): a rank's manifest
    missing or unreadable, or a file missing, of the wrong size or the wrong SHA-256."""
    directory = Path(directory)
    world = world_size(directory)
    for rank in range(max(world, 1)):
        manifest = _manifest(directory, rank)
        if manifest is None:
            return f"{directory / f'manifest-rank{rank}.json'} is missing or unreadable"
        for name, want in manifest["files"].items():
            path = directory / name
            if not path.exists():
                return f"{path} is missing"
            if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
                return f"{path} does not match its manifest (truncated or changed)"
    return None


def all_checkpoints(ray_dir: Path) -> list[Path]:
    """Every checkpoint directory of every attempt under `ray_dir`, oldest step first."""
    found = [p for p in Path(ray_dir).glob(f"*/{PREFIX}*") if p.is_dir()]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.parent.name))


def latest_intact(ray_dir: Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint; each newer broken one is named in a warning."""
    for candidate in reversed(all_checkpoints(ray_dir)):
        why = problem(candidate)
        if why is None:
            return candidate
        if warn:
            warnings.warn(f"skipping checkpoint {candidate.name}: {why}", stacklevel=2)
    return None


def prune(ray_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` intact checkpoints across attempts (broken ones
    older than the newest kept go too); returns what was deleted."""
    kept: list[Path] = []
    deleted = []
    for candidate in reversed(all_checkpoints(ray_dir)):
        if len(kept) < keep and problem(candidate) is None:
            kept.append(candidate)
        elif kept:
            shutil.rmtree(candidate, ignore_errors=True)
            deleted.append(candidate)
    return deleted
