"""MLflow against a real `mlflow server` on 127.0.0.1: a run logs there; an outage
mid-run loses nothing (params, tags, metrics, artifacts and status are queued and
retried), whether the server comes back before the run ends or only after it,
when `gradlane sync` sends the run from its directory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_LM
from mlflow.tracking import MlflowClient
from mp_utils import free_port

from gradlane.cli import main
from gradlane.launcher import run
from gradlane.runs import read_info
from gradlane.tracking import Tracker, sync

pytestmark = pytest.mark.slow


class MlflowServer:
    """`mlflow server` in a subprocess, backed by SQLite under `root`."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not start within 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server", free_port()).start()
    yield srv
    srv.stop()


def test_lm_run_logs_to_a_real_mlflow_server(local_ray, server, tmp_path):
    result = run(
        "lm",
        [*TINY_LM, "run.steps=4", f"run.output_dir={tmp_path / 'out'}",
         f"tracking.uri={server.uri}", "tracking.experiment=e2e-http"],
        show_progress=False,
    )  # fmt: skip
    client = MlflowClient(server.uri)
    mlrun = client.get_run(result.run_id)
    assert mlrun.info.status == "FINISHED"
    assert client.get_experiment(mlrun.info.experiment_id).name == "e2e-http"
    assert mlrun.data.params["run.steps"] == "4"
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 4
    assert {"config.yaml", "loss.png"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing went to the local store


def test_tracker_keeps_everything_through_an_outage(server, tmp_path):
    tracker = Tracker.start(server.uri, "outage", "r", tmp_path, retry_every_s=0.5)
    tracker.log_metrics(1, {"loss": 1.0})
    deadline = time.time() + 30
    while tracker.pending() and time.time() < deadline:
        time.sleep(0.1)
    assert tracker.pending() == 0

    server.stop()
    (tmp_path / "plot.txt").write_text("a plot")
    tracker.log_params({"a": 1})
    tracker.set_tag("phase", "down")
    for step in (2, 3):
        tracker.log_metrics(step, {"loss": float(step)})
    tracker.log_artifact(tmp_path / "plot.txt")
    time.sleep(1.5)  # a few failed tries
    assert tracker.pending() >= 5
    steps = [json.loads(line)["step"] for line in tracker.local.read_text().splitlines()]
    assert steps == [1, 2, 3]  # the local file has everything meanwhile

    server.start()  # same port, same database
    assert tracker.finish("FINISHED", timeout_s=60)
    client = MlflowClient(server.uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    mlrun = client.get_run(tracker.run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params == {"a": "1"} and mlrun.data.tags["phase"] == "down"
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["plot.txt"]


def _run_with_outage(out: Path, uri: str, server: MlflowServer, steps: int, extra: list[str]):
    """A launcher run whose server is stopped after its first metrics arrive."""
    outcome = {}
    args = [*TINY_LM, f"run.steps={steps}", "trainer.num_workers=1", "debug.step_delay_s=0.25",
            f"run.output_dir={out}", "run.name=r", f"tracking.uri={uri}",
            "tracking.retry_every_s=0.5", *extra]  # fmt: skip
    thread = threading.Thread(
        target=lambda: outcome.update(result=run("lm", args, show_progress=False)), daemon=True
    )
    thread.start()
    metrics = out / "r" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.1)
    server.stop()
    return thread, outcome, metrics


def test_launcher_run_survives_an_outage_that_ends_before_the_run(local_ray, server, tmp_path):
    thread, outcome, metrics = _run_with_outage(tmp_path, server.uri, server, 24, [])
    while metrics.read_text().count("\n") < 8:  # training goes on while the server is down
        assert thread.is_alive()
        time.sleep(0.1)
    server.start()
    thread.join(timeout=300)
    result = outcome["result"]
    client = MlflowClient(server.uri)
    mlrun = client.get_run(result.run_id)
    assert mlrun.info.status == "FINISHED"
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 24
    assert {"config.yaml", "loss.png"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert read_info(result.run_dir)["synced"] is True


def test_outage_past_the_end_then_gradlane_sync(local_ray, server, tmp_path):
    thread, outcome, _ = _run_with_outage(
        tmp_path, server.uri, server, 8, ["tracking.finish_timeout_s=1"]
    )
    with pytest.warns(UserWarning, match="gradlane sync"):
        thread.join(timeout=300)  # the run ends while the server is still down
    result = outcome["result"]
    info = read_info(result.run_dir)
    assert info["status"] == "FINISHED" and info["synced"] is False
    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(result.run_id).info.status == "RUNNING"  # what it last heard
    assert len(client.get_metric_history(result.run_id, "train/loss")) < 8

    assert main(["sync", str(result.run_dir)]) == 0
    mlrun = client.get_run(result.run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["run.steps"] == "8"
    history = client.get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # each step once
    assert {"config.yaml", "loss.png"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert read_info(result.run_dir)["synced"] is True

    other = f"sqlite:///{tmp_path / 'other.db'}"  # move the run to another store
    uri, copy_id = sync(result.run_dir, other)
    assert sync(result.run_dir, other) == (uri, copy_id)  # the copy is reused
    copy = MlflowClient(other)
    assert copy.get_run(copy_id).info.status == "FINISHED"
    assert len(copy.get_metric_history(copy_id, "train/loss")) == 8
