"""The driver: start or join Ray, run a Ray Train `TorchTrainer`, track in MLflow.

No `ray.address`: an embedded local Ray is started (dashboard off) and shut
down at the end; `ray.address=auto` or `ray://host:port` joins an existing
cluster. Rank 0 pushes metric records to a small actor; the driver drains it
for the progress bar, `metrics.jsonl` and MLflow, so tracking works the same
whichever node rank 0 lands on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import compose, flatten, to_yaml
from .errors import ConfigError
from .recipe import WorkerContext
from .tracking import Tracker, default_uri
from .training import PROGRESS_NAMESPACE

RUN_FILE = "run.json"
CHECKPOINT_GLOB = "ray/*/checkpoint_*"


@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    tracking_uri: str
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: highest step with the model and the
    state of every rank (a directory cut short by a crash is passed over)."""
    workers = OmegaConf.load(run_dir / "config.yaml").trainer.num_workers
    complete = [
        p
        for p in run_dir.glob(CHECKPOINT_GLOB)
        if (p / "model.pt").exists() and all((p / f"rank{r}.pt").exists() for r in range(workers))
    ]
    return max(complete, key=lambda p: int(p.name.rsplit("_", 1)[1]), default=None)


def resolve_resume(path: str) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for `resume=PATH` given a run or a checkpoint directory."""
    p = Path(path).expanduser().resolve()
    if (p / "model.pt").exists():
        run_dir = next((a for a in p.parents if (a / RUN_FILE).exists()), None)
        if run_dir is None:
            raise ConfigError(f"resume={path!r}: checkpoint is not inside a gradlane run directory")
        return run_dir, p
    if not (p / RUN_FILE).exists():
        raise ConfigError(f"resume={path!r} is neither a gradlane run nor a checkpoint directory")
    checkpoint = latest_checkpoint(p)
    if checkpoint is None:
        raise ConfigError(f"resume={path!r}: the run has no complete checkpoint yet")
    return p, checkpoint


def prepare(recipe: str, file: Path | None, overrides: list[str]) -> tuple[DictConfig, Path | None]:
    """Compose and validate the config; for `resume=...` start from the run's saved config."""
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    overrides = [o for o in overrides if not o.startswith("resume=")]
    base, checkpoint = None, None
    if resume:
        run_dir, checkpoint = resolve_resume(resume)
        base = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        if base["run"]["recipe"] != recipe:
            raise ConfigError(
                f"resume={resume!r} is a {base['run']['recipe']!r} run, not {recipe!r}"
            )
        base["resume"] = str(run_dir)
    cfg = compose(recipe, file, overrides, base=base)
    check_output_dir(cfg.run.output_dir)
    _dry_build(cfg)
    if checkpoint is not None:
        written = len(list(checkpoint.glob("rank*.pt")))
        if written != cfg.trainer.num_workers:
            raise ConfigError(
                f"trainer.num_workers={cfg.trainer.num_workers}: checkpoint {checkpoint} was "
                f"written by {written} workers; resume with trainer.num_workers={written}"
            )
    return cfg, checkpoint


def _dry_build(cfg: DictConfig) -> None:
    """Build the recipe's task once on the driver, so that its own checks of the
    `model` and `data` sections fail here (exit code 2) rather than in a worker."""
    import torch

    from gradlane.recipes import RECIPES

    device = torch.device("cuda" if cfg.trainer.use_gpu else "cpu")
    ctx = WorkerContext(0, cfg.trainer.num_workers, device, cfg.run.seed)
    try:
        RECIPES.get(cfg.run.recipe).build(cfg, ctx)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cfg.run.recipe} recipe: {exc}") from exc


def _start_ray(cfg: DictConfig) -> bool:
    """Start an embedded Ray or join `ray.address`; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cfg.ray.address:
        try:
            ray.init(address=cfg.ray.address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"ray.address={cfg.ray.address!r}: cannot connect ({exc})") from exc
        return True
    num_cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count() or 1
    # Ray's default token auth stays on; only its "auth is enabled" notice is hushed.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    ray.init(num_cpus=num_cpus, **common)
    return True


def _check_capacity(cfg: DictConfig) -> None:
    import ray

    have = ray.cluster_resources()
    need_cpu = cfg.trainer.num_workers * cfg.trainer.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        most = int(have.get("CPU", 0) // cfg.trainer.cpus_per_worker)
        raise ConfigError(
            f"trainer.num_workers={cfg.trainer.num_workers} x trainer.cpus_per_worker="
            f"{cfg.trainer.cpus_per_worker} needs {need_cpu} CPUs but the Ray cluster has "
            f"{have.get('CPU', 0):g}; allowed: num_workers <= {most}"
        )
    if cfg.trainer.use_gpu and cfg.trainer.num_workers > have.get("GPU", 0):
        raise ConfigError(
            f"trainer.num_workers={cfg.trainer.num_workers} with trainer.use_gpu=true needs one "
            f"GPU each but the Ray cluster has {have.get('GPU', 0):g}"
        )


def _progress_actor(name: str):
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Mailbox between rank 0 and the driver: metric records and artifact files."""

        def __init__(self):
            self.records: list[dict[str, Any]] = []
            self.files: dict[str, bytes] = {}

        def push(self, record: dict[str, Any]) -> None:
            self.records.append(record)

        def drain(self) -> list[dict[str, Any]]:
            out, self.records = self.records, []
            return out

        def add_artifacts(self, files: dict[str, bytes]) -> None:
            self.files.update(files)

        def artifacts(self) -> dict[str, bytes]:
            return self.files

    return Progress.options(name=name, namespace=PROGRESS_NAMESPACE).remote()


def _run_name(cfg: DictConfig) -> str:
    name = cfg.run.name or f"{cfg.run.recipe}-{datetime.now():%Y%m%d-%H%M%S}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"run.name={name!r} may only hold letters, digits, '.', '_' and '-'")
    return name


def check_output_dir(output_dir: str) -> None:
    """`run.output_dir` is, or can be made, a writable directory: a scratch directory is
    made (and removed) in its nearest existing ancestor, so nothing is left behind."""
    probe = Path(output_dir).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"run.output_dir={output_dir!r}: {probe} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as exc:
        raise ConfigError(
            f"run.output_dir={output_dir!r}: cannot write in {probe} ({exc.strerror})"
        ) from exc


def launch(
    cfg: DictConfig, checkpoint: Path | None = None, show_progress: bool = True
) -> RunResult:
    """Run `cfg` on Ray Train and track it in MLflow; returns where everything went."""
    resumed = Path(cfg.resume) if cfg.resume else None
    if resumed is not None:
        run_dir = resumed
        previous = {k: v for k, v in json.loads((run_dir / RUN_FILE).read_text()).items() if v}
    else:
        run_dir = (Path(cfg.run.output_dir) / _run_name(cfg)).resolve()
        if run_dir.exists():
            raise ConfigError(f"run.name={run_dir.name!r}: {run_dir} already exists")
        previous = {}
    uri = (
        cfg.tracking.uri
        or previous.get("tracking_uri")
        or default_uri(Path(cfg.run.output_dir).resolve())
    )

    if not uri.startswith("sqlite:"):
        Tracker.check(uri)
    started_ray = _start_ray(cfg)
    try:
        _check_capacity(cfg)
        if uri.startswith("sqlite:"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        tracker = Tracker.start(
            uri, cfg.tracking.experiment, run_dir.name, run_dir, previous.get("run_id")
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / RUN_FILE).write_text(
            json.dumps({"run_id": tracker.run_id, "tracking_uri": uri}, indent=2)
        )
        if previous.get("run_id"):  # MLflow params are immutable: note the resume instead
            tracker.set_tag("gradlane.resumed_from", str(checkpoint))
        else:
            tracker.log_params(flatten(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
        return _train(cfg, run_dir, tracker, checkpoint, show_progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _train(cfg, run_dir: Path, tracker: Tracker, checkpoint, show_progress: bool) -> RunResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from tqdm import tqdm

    from .training import train_loop

    attempt = len(list(run_dir.glob("ray/*"))) + 1
    actor_name = f"progress-{tracker.run_id}-{attempt}"
    progress = _progress_actor(actor_name)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "run_dir": str(run_dir),
            "progress_actor": actor_name,
            "resume_from": str(checkpoint) if checkpoint else None,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.trainer.num_workers,
            use_gpu=cfg.trainer.use_gpu,
            resources_per_worker={"CPU": cfg.trainer.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"attempt-{attempt}",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    start = time.time()
    thread.start()
    import ray

    bar = tqdm(
        total=cfg.run.steps, desc=cfg.run.recipe, unit="step", disable=not show_progress,
        dynamic_ncols=True,
    )  # fmt: skip
    last: dict[str, float] = {}
    try:
        _follow(thread, progress, tracker, bar, last, cfg.run.steps)
    except KeyboardInterrupt:
        tracker.finish("KILLED")  # the MLflow run says what happened; checkpoints stay
        raise
    bar.close()
    wall = time.time() - start

    if "error" in outcome:
        tracker.finish("FAILED")
        raise TrainingFailed(f"training failed: {_summary_line(outcome['error'])}") from outcome[
            "error"
        ]
    result = outcome["result"]
    _save_artifacts(run_dir, tracker, ray.get(progress.artifacts.remote()))
    tracker.finish("FINISHED")
    ckpt = Path(result.checkpoint.path) if result.checkpoint else latest_checkpoint(run_dir)
    return RunResult(run_dir, tracker.run_id, tracker.uri, ckpt, last, wall)


def _follow(thread, progress, tracker: Tracker, bar, last: dict, steps: int) -> None:
    """Drain rank 0's records into the bar, metrics.jsonl and MLflow until fit() ends."""
    import ray

    while True:
        alive = thread.is_alive()
        for record in ray.get(progress.drain.remote()):
            step = int(record.pop("step"))
            if "resumed_from" in record:
                bar.reset(total=steps)
                bar.update(step)
                continue
            tracker.log_metrics(step, record)
            last.update(record)
            bar.update(max(0, step - bar.n))
            bar.set_postfix(_postfix(last), refresh=False)
        tracker.flush()
        if not alive:
            return
        time.sleep(0.5)


class TrainingFailed(RuntimeError):
    """Training raised on the workers (after any restarts allowed by max_failures)."""


def _summary_line(exc: BaseException) -> str:
    """The last line of an exception's text: for a worker traceback, the error itself."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    out = {}
    if "train/loss" in metrics:
        out["loss"] = f"{metrics['train/loss']:.3f}"
    if "samples_per_s" in metrics:
        out["samples/s"] = f"{metrics['samples_per_s']:.0f}"
    return out


def _save_artifacts(run_dir: Path, tracker: Tracker, files: dict[str, bytes]) -> None:
    out = run_dir / "artifacts"
    out.mkdir(exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    plot_metrics(tracker.local, out / "loss.png")
    for path in sorted(out.iterdir()):
        tracker.log_artifact(path)


def plot_metrics(metrics_file: Path, out: Path) -> None:
    """Train and validation loss against step, from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        for key in ("train/loss", "val/loss"):
            if key in record:
                series.setdefault(key, {})[record["step"]] = record[key]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in series.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label=key, marker="o" if "val" in key else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def summary_table(result: RunResult) -> str:
    """The final summary the CLI prints."""
    rows = [("run directory", str(result.run_dir)), ("wall time", f"{result.wall_s:.1f} s")]
    for key in sorted(result.metrics):
        value = result.metrics[key]
        rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    rows += [
        ("checkpoint", str(result.checkpoint)),
        ("mlflow run", result.run_id),
        ("mlflow ui", f"mlflow ui --backend-store-uri {result.tracking_uri}"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"{line}\n{body}\n{line}"


def run(recipe: str, overrides: list[str] = (), file: Path | None = None, **kwargs) -> RunResult:
    """Python entry point: `gradlane.launcher.run("lm", ["run.steps=50"])`."""
    cfg, checkpoint = prepare(recipe, file, list(overrides))
    return launch(cfg, checkpoint, **kwargs)
