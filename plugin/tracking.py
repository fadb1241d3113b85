"""MLflow tracking from the driver: params, metrics, artifacts, and no lost metrics.

Every metric record is appended to `<run dir>/metrics.jsonl` first, then sent to
MLflow in batches. If the tracking server goes away mid-run, a warning is
printed once, training goes on, and the unsent metrics are retried at the next
flush (and at the end), so nothing is lost. An unreachable server at start is
a `ConfigError` before any training starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigError

RETRY_SECONDS = 10.0


def default_uri(output_dir: Path) -> str:
    """The local store: a SQLite database beside the runs (`mlflow ui --backend-store-uri`)."""
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def _client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter

    return MlflowClient(tracking_uri=uri)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


class Tracker:
    """One MLflow run, created (or reopened, on resume) by the driver."""

    def __init__(self, client, run_id: str, uri: str, run_dir: Path):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.local = run_dir / "metrics.jsonl"
        self._pending: list[Any] = []
        self._down_since: float | None = None

    @staticmethod
    def check(uri: str) -> None:
        """Raise ConfigError unless the tracking store at `uri` answers."""
        try:
            _client(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
            raise ConfigError(f"tracking.uri={uri!r} is unreachable: {_reason(exc)}") from exc

    @classmethod
    def start(
        cls, uri: str, experiment: str, run_name: str, run_dir: Path, run_id: str | None = None
    ) -> Tracker:
        """Check the store is reachable, then create the run (or reopen `run_id`)."""
        client = _client(uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                return cls(client, run_id, uri, run_dir)
            if exp is None:
                location = None
                if uri.startswith("sqlite:"):
                    location = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
                    location = location.resolve().as_uri()
                exp_id = client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run = client.create_run(
                exp_id, run_name=run_name, tags={"gradlane.run_dir": str(run_dir)}
            )
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
            raise ConfigError(f"tracking.uri={uri!r} is unreachable: {_reason(exc)}") from exc
        return cls(client, run.info.run_id, uri, run_dir)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tag(self, key: str, value: str) -> None:
        self._call(self.client.set_tag, self.run_id, key, value)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append to the local file, queue for MLflow."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.local.open("a") as f:
            f.write(json.dumps({"step": step, "time": now, **metrics}) + "\n")
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self, force: bool = False) -> bool:
        """Send queued metrics; on failure keep them and retry later. True when all sent."""
        if not self._pending:
            return True
        if not force and self._down_since and time.time() - self._down_since < RETRY_SECONDS:
            return False
        while self._pending:
            batch = self._pending[:1000]
            if not self._call(self.client.log_batch, self.run_id, metrics=batch):
                return False
            del self._pending[: len(batch)]
        return True

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), subdir)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.flush(force=True):
            warnings.warn(
                f"MLflow at {self.uri} is unreachable: {len(self._pending)} metric values were "
                f"not sent; all of them are in {self.local}",
                stacklevel=2,
            )
        self._call(self.client.set_terminated, self.run_id, status)

    def _call(self, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            if self._down_since is None:
                warnings.warn(
                    f"MLflow at {self.uri} failed ({type(exc).__name__}); training continues, "
                    f"metrics are kept in {self.local} and retried",
                    stacklevel=3,
                )
            self._down_since = time.time()
            return False
        if self._down_since is not None:
            self._down_since = None
        return True
