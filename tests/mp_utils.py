"""Run a function on N real processes talking gloo over 127.0.0.1 (for multi-process tests)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, out_dir, init, timeout_s, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    if init:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
    torch.save(fn(rank, world, *args), Path(out_dir) / f"{rank}.pt")
    if dist.is_initialized():
        dist.barrier()  # every rank is done with its collectives
    # Exit without tearing gloo down: its teardown at exit aborts now and then
    # ("terminate called without an active exception", SIGABRT) after correct work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world: int, *args, init: bool = True, timeout_s: float = 120.0) -> list:
    """`fn(rank, world, *args)` on `world` spawned processes; their return values by rank.

    With `init=True` each process joins a gloo process group first; with `init=False`
    only the env:// variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) are set,
    for frameworks that initialise torch.distributed themselves. `fn` must be a
    module-level function; a failure in any process raises here, and a collective that
    waits longer than `timeout_s` (a rank that never joins) fails instead of hanging.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _entry, args=(fn, world, free_port(), out_dir, init, timeout_s, args), nprocs=world
        )
        return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=False) for r in range(world)]
