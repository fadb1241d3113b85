"""MLflow against a real `mlflow server` on 127.0.0.1: a run logs there, and an
outage mid-run loses nothing (metrics wait in metrics.jsonl and are resent)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_LM
from mlflow.tracking import MlflowClient
from mp_utils import free_port

from gradlane.launcher import run
from gradlane.tracking import Tracker

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


def test_server_outage_mid_run_loses_no_metric(server, tmp_path):
    tracker = Tracker.start(server.uri, "outage", "r", tmp_path)
    tracker.log_metrics(1, {"loss": 1.0})
    assert tracker.flush()

    server.stop()
    with pytest.warns(UserWarning, match="training continues"):
        for step in (2, 3):
            tracker.log_metrics(step, {"loss": float(step)})
            assert not tracker.flush(force=True)
    steps = [json.loads(line)["step"] for line in tracker.local.read_text().splitlines()]
    assert steps == [1, 2, 3]  # the local file has everything meanwhile

    server.start()  # same port, same database
    tracker.finish()
    history = MlflowClient(server.uri).get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert MlflowClient(server.uri).get_run(tracker.run_id).info.status == "FINISHED"
