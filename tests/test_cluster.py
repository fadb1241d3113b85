"""Real clusters: a `ray start --head` on this machine (token authentication on), joined by
address and through Ray Client with `run.storage`; the embedded default stays embedded
next to it and next to a stale cluster file. Ray runs in private temp directories, and
the head is stopped by ending its own `ray start --block` process."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_LM
from mlflow.tracking import MlflowClient
from mp_utils import free_port

from gradlane.cluster import check_ray_version, join_error
from gradlane.errors import ConfigError
from gradlane.runs import read_info

# Ray Client's server waits 30 s for a client's own server process; on a loaded 2-core
# machine starting one can take longer ("Initialization failure from server").
SLOW_MACHINE = {"RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"}
ONE = [*TINY_LM, "run.steps=2", "run.eval_every=2", "trainer.num_workers=1", "--no-progress"]


@dataclass
class Head:
    port: int
    client_port: int
    env: dict[str, str]  # what a driver needs to join it


@pytest.fixture(scope="module")
def ray_tmp():
    path = Path(tempfile.mkdtemp(prefix="glr", dir="/tmp"))  # short: Ray's socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def head(ray_tmp):
    token = secrets.token_hex(16)
    port, client_port = free_port(), free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}",
         f"--ray-client-server-port={client_port}", "--num-cpus=1", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp), **auth, **SLOW_MACHINE},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 90
    while not (ray_tmp / "ray" / "ray_current_cluster").exists():
        assert proc.poll() is None and time.time() < deadline, "ray start --head failed"
        time.sleep(0.5)
    yield Head(port, client_port, auth)
    proc.terminate()
    proc.wait(timeout=60)


def _run(tmp_path: Path, *args: str, env: dict[str, str]):
    """`gradlane run lm` in a shell with no Ray auth settings but those in `env`."""
    exe = Path(sys.executable).with_name("gradlane")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run(
        [str(exe), "run", "lm", *ONE, f"run.output_dir={tmp_path}", *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_embedded_ray_ignores_a_stale_cluster_file(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="glr", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # long gone
        proc = _run(tmp_path, "ray.num_cpus=1", env={"RAY_TMPDIR": str(ray_tmp)})
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_embedded_ray_does_not_join_a_running_head(head, ray_tmp, tmp_path):
    # the head has 1 CPU; 2 workers only fit in a fresh embedded Ray of 2 CPUs
    proc = _run(
        tmp_path, "trainer.num_workers=2", "ray.num_cpus=2", env={"RAY_TMPDIR": str(ray_tmp)}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_joining_a_token_cluster_without_the_token_says_what_to_set(head, tmp_path):
    proc = _run(tmp_path, f"ray.address=127.0.0.1:{head.port}", env={})
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gradlane: error")]
    assert f"ray.address='127.0.0.1:{head.port}': cannot connect" in line
    assert "set RAY_AUTH_MODE=token" in line
    assert not (tmp_path / "mlflow.db").exists()


def _client_server_logs(ray_tmp: Path) -> str:
    """The tail of the head's Ray Client server logs: why a client was turned away."""
    logs = sorted((ray_tmp / "ray").glob("session_*/logs/ray_client_server*"))
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


@pytest.mark.parametrize("client", [False, True], ids=["address", "ray-client"])
def test_run_on_a_started_head(head, ray_tmp, tmp_path, client):
    address = f"ray://127.0.0.1:{head.client_port}" if client else f"127.0.0.1:{head.port}"
    storage = tmp_path / "shared"  # stands for a mount every node sees
    proc = _run(tmp_path / "out", f"ray.address={address}", f"run.storage={storage}",
                "run.name=joined", env=head.env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + _client_server_logs(ray_tmp)
    run_dir = tmp_path / "out" / "joined"
    info = read_info(run_dir)
    assert info["status"] == "FINISHED" and Path(info["storage"]) == storage / "joined"
    assert list((storage / "joined").glob("attempt-1/checkpoint_00000002/manifest-rank0.json"))
    assert not (run_dir / "ray").exists()  # checkpoints went to run.storage only
    mlrun = MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    assert mlrun.info.status == "FINISHED" and "val/loss" in mlrun.data.metrics


def test_ray_version_is_checked():
    check_ray_version("2.51.0")
    with pytest.raises(ConfigError, match=r"Ray 2.50.1 is installed.*ray\[train\]>=2.51"):
        check_ray_version("2.50.1")


def test_join_error_names_token_auth_only_when_it_is_off(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "RAY_AUTH_MODE=token" in join_error("h:1", ConnectionError("Failed to connect"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "RAY_AUTH_MODE" not in join_error("h:1", ConnectionError("Failed to connect"))


def test_join_error_keeps_the_reason_from_a_ray_client_traceback():
    exc = ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n"
        '  File "proxier.py", line 780, in Datapath\n'
        "RuntimeError: Proxy failed to Connect to backend!\n"
    )
    line = join_error("ray://h:10001", exc)
    assert "\n" not in line
    assert "cannot connect (Initialization failure from server: RuntimeError: Proxy" in line
