"""Run a function in N real processes joined by a gloo process group on 127.0.0.1.

    results = run_ranks(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) in each rank

`fn` must be importable (a module-level function); its return value (anything
`torch.save` takes) comes back in rank order. Each child uses one intra-op thread.
An exception in any rank fails the call.
"""

from __future__ import annotations

import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0) -> list:
    """fn(rank, world_size, *args) in `world_size` spawned gloo processes; their results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _child,
            args=(fn, world_size, free_port(), timeout_s, tmp, args),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def _child(rank, fn, world_size, port, timeout_s, tmp, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(tmp) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
