"""MLflow tracking from the driver that an outage cannot make lose anything.

Everything is written to the run directory first (`config.yaml`,
`metrics.jsonl`, `artifacts/`, the status in `run.json`); MLflow gets it from a
background thread that sends params, tags, metrics, artifacts and the final
status in order, and while the server is down keeps them and retries every
`tracking.retry_every_s` without stalling training. A server back before the
run ends gets everything; at the end the driver waits up to
`tracking.finish_timeout_s` for the queue to drain, and what is still unsent
then is marked in `run.json` (`"synced": false`) for `gradlane sync RUN_DIR`,
which (re)sends a whole run from its directory to its own or any other
tracking URI (MLflow drops metric values it already has). An unreachable
server at start is a `ConfigError` before any training starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .runs import METRICS_FILE, read_info, update_info

BATCH = 1000  # MLflow's limit of metric values per log_batch
TERMINAL = ("FINISHED", "FAILED", "KILLED")


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


def _experiment_id(client, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


class Tracker:
    """One MLflow run, created (or reopened, on resume) by the driver; sends in the background."""

    def __init__(self, client, run_id: str, uri: str, run_dir: Path, retry_every_s: float = 5.0):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.local = run_dir / METRICS_FILE
        self.retry_every_s = retry_every_s
        self._queue: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._down = False
        self._thread = threading.Thread(target=self._send_loop, daemon=True, name="mlflow-sender")
        self._thread.start()

    @staticmethod
    def check(uri: str) -> None:
        """Raise ConfigError unless the tracking store at `uri` answers."""
        try:
            _client(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
            raise ConfigError(f"tracking.uri={uri!r} is unreachable: {_reason(exc)}") from exc

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        run_dir: Path,
        run_id: str | None = None,
        retry_every_s: float = 5.0,
        tags: dict[str, str] | None = None,
    ) -> Tracker:
        """Create the run (or reopen `run_id`) with `tags`; ConfigError when the store
        does not answer."""
        client = _client(uri)
        try:
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
            else:
                run_id = client.create_run(
                    _experiment_id(client, uri, experiment),
                    run_name=run_name,
                    tags={"gradlane.run_dir": str(run_dir), **(tags or {})},
                ).info.run_id
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
            raise ConfigError(f"tracking.uri={uri!r} is unreachable: {_reason(exc)}") from exc
        return cls(client, run_id, uri, run_dir, retry_every_s)

    # ---- what the driver records -------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._put("params", items[i : i + 100])

    def set_tag(self, key: str, value: str) -> None:
        self._put("tag", (key, value))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append to the local file, queue for MLflow."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.local.open("a") as f:
            f.write(json.dumps({"step": step, "time": now, **metrics}) + "\n")
        self._put("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._put("artifact", (str(path), subdir))

    def pending(self) -> int:
        """How many queued items MLflow has not acknowledged yet."""
        with self._wake:
            return len(self._queue)

    def finish(self, status: str = "FINISHED", timeout_s: float = 30.0) -> bool:
        """Queue the terminal status and wait up to `timeout_s` for everything to be sent.

        True when MLflow has it all; otherwise a warning names `gradlane sync`."""
        self._put("status", status)
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._queue and time.monotonic() < deadline:
                self._wake.wait(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
            self._closing = True
            left = len(self._queue)
            self._wake.notify_all()
        if left:
            warnings.warn(
                f"MLflow at {self.uri} is unreachable: {left} items (metrics, params, "
                f"artifacts, status) were not sent; everything is in {self.local.parent}: "
                f"`gradlane sync {self.local.parent}` sends it",
                stacklevel=2,
            )
        return left == 0

    # ---- the sender thread ----------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        with self._wake:
            self._queue.append((kind, payload))
            self._wake.notify_all()

    def _next(self) -> tuple[str, Any, int]:
        """The head of the queue; consecutive metric items coalesce into one batch."""
        kind, payload = self._queue[0]
        count = 1
        if kind == "metrics":
            payload = list(payload)
            while count < len(self._queue) and self._queue[count][0] == "metrics":
                more = self._queue[count][1]
                if len(payload) + len(more) > BATCH:
                    break
                payload += more
                count += 1
        return kind, payload, count

    def _send(self, kind: str, payload: Any) -> None:
        if kind == "params":
            self.client.log_batch(self.run_id, params=payload)
        elif kind == "metrics":
            self.client.log_batch(self.run_id, metrics=payload)
        elif kind == "tag":
            self.client.set_tag(self.run_id, *payload)
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, *payload)
        else:
            self.client.set_terminated(self.run_id, payload)

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                kind, payload, count = self._next()
            try:
                self._send(kind, payload)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                if not self._down:
                    warnings.warn(
                        f"MLflow at {self.uri} failed ({type(exc).__name__}: {_reason(exc)}); "
                        f"training continues, everything is kept in {self.local.parent} and "
                        f"retried every {self.retry_every_s:g} s",
                        stacklevel=2,
                    )
                self._down = True
                with self._wake:
                    self._wake.wait(timeout=self.retry_every_s)
                continue
            self._down = False
            with self._wake:
                for _ in range(count):
                    self._queue.popleft()
                self._wake.notify_all()


def sync(run_dir: Path, uri: str | None = None) -> tuple[str, str]:
    """Send a run's params, metrics, artifacts and status from its directory to `uri`
    (default: its own tracking URI); returns (uri, run id there).

    The run is created there when that store does not have it (its id is then kept in
    run.json under `copies`), so this also moves runs between servers."""
    from mlflow.entities import Metric, Param
    from omegaconf import OmegaConf

    from .config import flatten

    run_dir = Path(run_dir).resolve()
    info = read_info(run_dir)
    if not info or not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a gradlane run directory (no run.json/config.yaml)")
    target = uri or info["tracking_uri"]
    own = target == info.get("tracking_uri")
    copies = dict(info.get("copies", {}))
    run_id = info.get("run_id") if own else copies.get(target)
    Tracker.check(target)
    client = _client(target)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - not in that store: create it below
            run_id = None
    if run_id is None:
        run_id = client.create_run(
            _experiment_id(client, target, cfg.tracking.experiment),
            run_name=run_dir.name,
            tags={"gradlane.run_dir": str(run_dir)},
        ).info.run_id
        if own:
            update_info(run_dir, run_id=run_id)
        else:
            copies[target] = run_id
            update_info(run_dir, copies=copies)

    params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    metrics = []
    if (run_dir / METRICS_FILE).exists():
        for line in (run_dir / METRICS_FILE).read_text().splitlines():
            record = json.loads(line)
            step, stamp = record.pop("step"), record.pop("time")
            metrics += [Metric(k, float(v), stamp, step) for k, v in record.items()]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])
    files = [run_dir / "config.yaml", *sorted(run_dir.glob("resume-*.yaml"))]
    if (run_dir / "artifacts").is_dir():
        files += sorted(p for p in (run_dir / "artifacts").iterdir() if p.is_file())
    for path in files:
        client.log_artifact(run_id, str(path))
    if info.get("status") in TERMINAL:
        client.set_terminated(run_id, info["status"])
    if own:
        update_info(run_dir, synced=True)
    return target, run_id
