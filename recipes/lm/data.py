"""The byte corpus: the running Python's standard-library `.py` sources.

Files are collected in sorted path order (site-packages excluded); every
`val_every`-th file goes to validation, the rest to training, so the split is
deterministic and by file. Text already on every machine: nothing is downloaded.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )


@lru_cache(maxsize=4)
def load_corpus(max_bytes: int = 8_000_000, val_every: int = 20) -> Corpus:
    """Concatenate files until `max_bytes` of training text (and proportional validation)."""
    if max_bytes < 1 or val_every < 2:
        raise ValueError(
            f"data.max_bytes={max_bytes} must be >= 1 and data.val_every={val_every} >= 2"
        )
    parts = {"train": bytearray(), "val": bytearray()}
    caps = {"train": max_bytes, "val": max_bytes // (val_every - 1) + 1}
    for i, path in enumerate(stdlib_files()):
        split = "val" if i % val_every == val_every - 1 else "train"
        if len(parts[split]) < caps[split]:
            parts[split] += path.read_bytes()
        if all(len(parts[k]) >= caps[k] for k in parts):
            break
    train, val = (
        torch.frombuffer(parts[k][: caps[k]], dtype=torch.uint8).clone() for k in ("train", "val")
    )
    return Corpus(train, val)


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows data[s : s + length] for each start s, as int64 tokens."""
    idx = starts[:, None] + torch.arange(length)[None, :]
    return data[idx].long()


def random_batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    """`batch` random windows of `length` bytes drawn with generator `gen`."""
    starts = torch.randint(0, data.numel() - length, (batch,), generator=gen)
    return windows(data, starts, length)


def eval_windows(data: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` evenly spaced, fixed validation windows of `length` bytes."""
    starts = torch.linspace(0, data.numel() - length - 1, count).long()
    return windows(data, starts, length)


def eval_batches(data: torch.Tensor, batch: int, length: int, n_batches: int):
    """The `batch * n_batches` validation windows split into `n_batches` batches."""
    return eval_windows(data, length, batch * n_batches).split(batch)
