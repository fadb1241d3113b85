"""The driver: start or join Ray, run a Ray Train `TorchTrainer`, track in MLflow.

No `ray.address`: a fresh embedded local Ray is started (dashboard off) and
shut down at the end; `ray.address=auto`, `host:port` or `ray://host:port`
joins an existing cluster (see `gradlane.cluster`). Rank 0 pushes metric
records to a small actor; the driver drains it for the progress bar,
`metrics.jsonl` and MLflow, so tracking works the same whichever node rank 0
lands on.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .checkpoint import prune
from .cluster import check_capacity, scaling_config, start_ray
from .comm import MIN_COMPRESSED_SHARE
from .config import compose, flatten, to_yaml
from .errors import ConfigError
from .recipe import WorkerContext
from .resume import check_resume, check_shapes, find_checkpoint, record_resume, saved_config
from .runs import RUN_POINTER, read_info, update_info
from .tracking import Tracker, default_uri
from .training import PROGRESS_NAMESPACE


@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    tracking_uri: str
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def _take(overrides: list[str], key: str) -> str | None:
    """The value of the last `key=...` override, removed from the list."""
    found = [o for o in overrides if o.startswith(f"{key}=")]
    for o in found:
        overrides.remove(o)
    return found[-1].split("=", 1)[1] if found else None


def prepare(recipe: str, file: Path | None, overrides: list[str]) -> tuple[DictConfig, Path | None]:
    """Compose and validate the config; for `resume=...` start from the run's saved config.

    Everything that can be checked without Ray is checked here, before anything is
    written: the config, the output directory, the recipe's own checks (a dry build),
    and a resume's or init_from's checkpoint (intact, and the model's shapes)."""
    overrides = list(overrides)
    resume = _take(overrides, "resume")
    base, run_dir, checkpoint = None, None, None
    if resume:
        run_dir, checkpoint = find_checkpoint("resume", resume)
        base = saved_config(run_dir)
        if base["run"]["recipe"] != recipe:
            raise ConfigError(
                f"resume={resume!r} is a {base['run']['recipe']!r} run, not {recipe!r}"
            )
        base["resume"] = str(run_dir)
    cfg = compose(recipe, file, overrides, base=base)
    if resume and cfg.init_from != base.get("init_from"):
        raise ConfigError(f"init_from={cfg.init_from!r} starts a new run; resume= continues one")
    if cfg.init_from and not resume:
        cfg.init_from = str(find_checkpoint("init_from", cfg.init_from)[1])
    check_writable("run.output_dir", cfg.run.output_dir)
    if cfg.run.storage:
        check_writable("run.storage", _storage_path(cfg.run.storage))
    model = _dry_build(cfg)
    if checkpoint is not None:
        check_resume(cfg, run_dir, checkpoint)
        check_shapes("resume", model, checkpoint)
    elif cfg.init_from:
        check_shapes("init_from", model, Path(cfg.init_from))
    return cfg, checkpoint


def _dry_build(cfg: DictConfig):
    """Build the recipe's task once on the driver, so that its own checks of the
    `model` and `data` sections fail here (exit code 2) rather than in a worker;
    returns the model it built."""
    import torch

    from gradlane.recipes import RECIPES

    device = torch.device("cuda" if cfg.trainer.use_gpu else "cpu")
    ctx = WorkerContext(0, cfg.trainer.num_workers, device, cfg.run.seed)
    try:
        return RECIPES.get(cfg.run.recipe).build(cfg, ctx).model
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cfg.run.recipe} recipe: {exc}") from exc


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


def check_writable(key: str, directory: str) -> None:
    """`directory` is, or can be made, a writable directory: a scratch directory is
    made (and removed) in its nearest existing ancestor, so nothing is left behind."""
    probe = Path(directory).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={directory!r}: {probe} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as exc:
        raise ConfigError(f"{key}={directory!r}: cannot write in {probe} ({exc.strerror})") from exc


def _storage_path(storage: str) -> str:
    """`run.storage` as a filesystem path (a `file://` URI or a path, e.g. a shared mount)."""
    path = storage.removeprefix("file://")
    if "://" in path:
        raise ConfigError(
            f"run.storage={storage!r}: give a filesystem path that every node sees (a shared "
            "mount); object-store URIs are not supported (checkpoints are verified as files)"
        )
    return path


def launch(
    cfg: DictConfig,
    checkpoint: Path | None = None,
    show_progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Run `cfg` on Ray Train and track it in MLflow; returns where everything went.

    `on_record` sees every metric record (with its step) as it arrives (a Tune trial
    reports them); `tags` go on a new MLflow run (a sweep's parent run id)."""
    resumed = Path(cfg.resume) if cfg.resume else None
    if resumed is not None:
        run_dir = resumed
        previous = {k: v for k, v in read_info(run_dir).items() if v}
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
    started_ray = start_ray(cfg)
    try:
        check_capacity(cfg, embedded=started_ray and not cfg.ray.address)
        if uri.startswith("sqlite:"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        tracker = Tracker.start(
            uri, cfg.tracking.experiment, run_dir.name, run_dir, previous.get("run_id"),
            cfg.tracking.retry_every_s, tags,
        )  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        storage = Path(previous.get("storage") or run_dir / "ray")
        if cfg.run.storage and not resumed:
            storage = Path(_storage_path(cfg.run.storage)).expanduser().resolve() / run_dir.name
        storage.mkdir(parents=True, exist_ok=True)
        (storage / RUN_POINTER).write_text(str(run_dir))
        attempt = len(list(storage.glob("attempt-*"))) + 1
        if resumed is None:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        else:
            record_resume(run_dir, attempt, cfg)
        external = str(storage) if storage != run_dir / "ray" else None  # a copied run dir
        update_info(  # keeps using its own ray/ when storage is the default
            run_dir, run_id=tracker.run_id, tracking_uri=uri, status="RUNNING", storage=external
        )
        if previous.get("run_id"):  # MLflow params are immutable: note the resume instead
            tracker.set_tag("gradlane.resumed_from", str(checkpoint))
        else:
            tracker.log_params(flatten(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
        try:
            return _train(
                cfg, run_dir, storage, attempt, tracker, checkpoint, show_progress, on_record
            )
        finally:
            prune(storage, cfg.trainer.keep_checkpoints)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _finish(cfg: DictConfig, run_dir: Path, tracker: Tracker, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED in run.json and (if it answers) in MLflow."""
    update_info(run_dir, status=status, synced=False)
    synced = tracker.finish(status, cfg.tracking.finish_timeout_s)
    update_info(run_dir, synced=synced)


def _train(
    cfg: DictConfig,
    run_dir: Path,
    storage: Path,
    attempt: int,
    tracker: Tracker,
    checkpoint: Path | None,
    show_progress: bool,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> RunResult:
    """One Ray Train attempt; `storage` (run.storage) must be visible to every node."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from tqdm import tqdm

    from .training import train_loop

    actor_name = f"progress-{tracker.run_id}-{attempt}"
    progress = _progress_actor(actor_name)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "storage": str(storage),
            "progress_actor": actor_name,
            "resume_from": str(checkpoint) if checkpoint else None,
            "init_from": cfg.init_from,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=f"attempt-{attempt}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints),
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
        _follow(thread, progress, tracker, bar, last, cfg.run.steps, on_record)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (Ray's handler exits)
        _finish(cfg, run_dir, tracker, "KILLED")  # checkpoints stay: resume= continues
        raise
    bar.close()
    wall = time.time() - start

    if "error" in outcome:
        _finish(cfg, run_dir, tracker, "FAILED")
        raise TrainingFailed(f"training failed: {_summary_line(outcome['error'])}") from outcome[
            "error"
        ]
    _save_artifacts(run_dir, tracker, ray.get(progress.artifacts.remote()))
    _finish(cfg, run_dir, tracker, "FINISHED")
    newest = ckpt.latest_intact(storage)
    return RunResult(run_dir, tracker.run_id, tracker.uri, newest, last, wall)


def _follow(thread, progress, tracker: Tracker, bar, last: dict, steps: int, on_record) -> None:
    """Drain rank 0's records into the bar, metrics.jsonl and MLflow until fit() ends."""
    import ray

    while True:
        alive = thread.is_alive()
        for record in ray.get(progress.drain.remote()):
            step = int(record.pop("step"))
            if "placement_group" in record:  # for the caller only (a sweep's trial)
                if on_record is not None:
                    on_record(record)
                continue
            if "resumed_from" in record:
                bar.reset(total=steps)
                bar.update(step)
                continue
            tracker.log_metrics(step, record)
            last.update(record)
            if on_record is not None:
                on_record({"step": step, **record})
            bar.update(max(0, step - bar.n))
            bar.set_postfix(_postfix(last), refresh=False)
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
    share = result.metrics.get("comm/compressed_share", 1.0)
    if share < MIN_COMPRESSED_SHARE:
        rows.append(("comm warning", f"the hook compressed only {share:.0%} of the gradient"))
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
