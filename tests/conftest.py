"""Shared fixtures: a local Ray for the end-to-end tests and a tiny lm config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small lm: a 20-step run takes seconds once Ray is up.
TINY_LM = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.context=32",
    "data.batch_size=8",
    "data.max_bytes=300000",
    "data.eval_batches=2",
    "run.log_every=1",
    "optimizer.warmup_steps=2",
]


@pytest.fixture(scope="module")
def one_rank_comm():
    """A real one-rank gloo group in this process, as a gradlane TorchCollective."""
    import torch.distributed as dist

    from gradlane.compressors import TorchCollective

    if dist.is_initialized():
        pytest.skip("another test left a process group initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield TorchCollective()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray (2 CPUs) per test module, shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny tensors: on a shared machine, handing each op
    to a second thread costs more than the op (a gradgradcheck: minutes, not seconds)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout=600):
    """Run the installed `gradlane` console script; returns the CompletedProcess."""
    exe = Path(sys.executable).with_name("gradlane")
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def gradlane_cli():
    """The `gradlane` command as a function: gradlane_cli("list") -> CompletedProcess."""
    return run_cli
