"""Checkpoint files on 2 real gloo ranks: replicated state once, per-rank state per rank,
an exact round trip, manifests that catch a truncated or missing file, retention."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from mp_utils import run_ranks

from gradlane import checkpoint as ckpt


class RankHook:
    """Stands for a comm hook whose error-feedback residual differs per rank."""

    def __init__(self, rank: int):
        self.residual = torch.full((3,), float(rank))

    def state_dict(self):
        return {"residual": self.residual.clone()}

    def load_state_dict(self, state):
        self.residual = state["residual"]


class Engine:
    """The engine interface `gradlane.checkpoint` uses, over a model, AdamW, a schedule and
    a hook; `save` writes a file of its own format, as DeepSpeed's engine does."""

    def __init__(self, rank: int, steps: int = 3):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1 / (1 + s))
        self.hook = RankHook(rank if steps else -1)
        self.rank = rank
        for step in range(steps):  # the same gradients on every rank, as after DDP's all-reduce
            self.module(torch.ones(1, 4) * step).sum().backward()
            self.optimizer.step()
            self.scheduler.step()

    def state_dict(self):
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "hook": self.hook.state_dict(),
        }

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.hook.load_state_dict(state["hook"])

    def save(self, directory: Path) -> None:
        (directory / "own").mkdir()
        (directory / "own" / f"part{self.rank}.bin").write_bytes(bytes([self.rank]) * 10)

    def load(self, directory: Path) -> None:
        assert (directory / "own" / f"part{self.rank}.bin").read_bytes()[0] == self.rank


def _save(rank: int, world: int, directory: str):
    engine = Engine(rank)
    torch.manual_seed(100 + rank)  # per-rank RNG streams
    ckpt.save(Path(directory) / f"rank-dir-{rank}", rank, 3, engine)
    return torch.rand(2)  # the draw after the checkpoint


def _save_and_reload(tmp_path: Path) -> Path:
    """Both ranks save into their own directory, merged as Ray Train does; then reload."""
    directory = tmp_path / "attempt-1" / ckpt.checkpoint_name(3)
    for rank in range(2):
        (directory / f"rank-dir-{rank}").mkdir(parents=True)
    draws = run_ranks(_save, 2, str(directory))
    for rank in range(2):
        shutil.copytree(directory / f"rank-dir-{rank}", directory, dirs_exist_ok=True)
        shutil.rmtree(directory / f"rank-dir-{rank}")
    for rank in range(2):
        fresh = Engine(rank, steps=0)
        assert ckpt.load(directory, rank, fresh) == 3
        assert torch.equal(torch.rand(2), draws[rank])  # the RNG continues exactly
        ref = Engine(rank)
        torch.testing.assert_close(
            fresh.module.state_dict(), ref.module.state_dict(), rtol=0, atol=0
        )
        torch.testing.assert_close(
            fresh.optimizer.state_dict(), ref.optimizer.state_dict(), rtol=0, atol=0
        )
        assert fresh.scheduler.state_dict() == ref.scheduler.state_dict()
        assert torch.equal(fresh.hook.residual, torch.full((3,), float(rank)))
    return directory


def test_replicated_state_is_written_once_and_everything_round_trips(tmp_path):
    directory = _save_and_reload(tmp_path)
    shared = torch.load(directory / "shared.pt", weights_only=False)
    assert set(shared) == {"optimizer", "scheduler"}  # equal on both ranks: once
    for rank in range(2):
        own = torch.load(directory / f"rank{rank}.pt", weights_only=False)
        assert set(own) == {"step", "rng", "hook"}  # the residual differs: per rank
    assert ckpt.problem(directory) is None and ckpt.world_size(directory) == 2


def test_manifests_catch_truncated_changed_and_missing_files(tmp_path):
    good = _save_and_reload(tmp_path)
    cases = {
        "truncated": lambda d: (d / "model.pt").open("r+b").truncate(50),
        "changed": lambda d: (d / "own" / "part1.bin").write_bytes(b"\1" * 9 + b"\0"),
        "no rank 1": lambda d: (d / "manifest-rank1.json").unlink(),
        "no model": lambda d: (d / "model.pt").unlink(),
    }
    expected = {
        "truncated": "model.pt does not match its manifest",
        "changed": "own/part1.bin does not match its manifest",  # an engine's own file
        "no rank 1": "manifest-rank1.json is missing",
        "no model": "model.pt is missing",
    }
    for name, damage in cases.items():
        broken = tmp_path / name / good.name
        shutil.copytree(good, broken)
        damage(broken)
        assert expected[name] in ckpt.problem(broken), name


def test_retention_keeps_the_newest_intact_across_attempts(tmp_path):
    good = _save_and_reload(tmp_path / "src")
    for attempt, step in ((1, 2), (1, 4), (2, 6), (2, 8), (3, 10)):
        shutil.copytree(good, tmp_path / f"attempt-{attempt}" / ckpt.checkpoint_name(step))
    broken = tmp_path / "attempt-3" / ckpt.checkpoint_name(12)  # a crash mid-copy, newest
    shutil.copytree(good, broken)
    (broken / "manifest-rank0.json").unlink()
    ckpt.prune(tmp_path, keep=2)
    left = [f"{p.parent.name}/{p.name}" for p in ckpt.all_checkpoints(tmp_path)]
    assert left == ["attempt-2/checkpoint_00000008", "attempt-3/checkpoint_00000010",
                    "attempt-3/checkpoint_00000012"]  # fmt: skip
    assert ckpt.latest_intact(tmp_path, warn=False).name == "checkpoint_00000010"
