"""`gradlane tune`: a Ray Tune sweep whose trials are gradlane runs.

    gradlane tune lm run.steps=300 --space 'optimizer.lr=loguniform(1e-4,1e-2)' \\
        --space 'comm.hook=choice(none,powersgd)' --samples 8 --metric val/loss --mode min --asha

Each trial is a whole gradlane run (its own Ray Train run, run directory
`<run.output_dir>/<sweep>/<trial>` and MLflow run), composed from the base
config and the trial's sampled values and validated like `gradlane run`. Its
MLflow run is a child (tag `mlflow.parentRunId`) of the sweep's parent run,
which gets the space, the best trial's values and a table of all trials.
Trials report every metric record to Tune; `--asha` lets ASHA stop poor
trials early, judged on `--metric` at `run.eval_every` steps (their MLflow runs
end KILLED, tagged `gradlane.stopped_early`). Every sampled key and bound is
validated before Ray starts.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .errors import ConfigError

WORKERS_KEY = "gradlane/placement_group"  # in a trial's reports: its Train workers' group
TRIAL_CPU = 0.01  # a trial only drives its Ray Train run (Tune needs a non-empty request)
SPACE = re.compile(r"^([\w.]+)=(choice|grid|uniform|loguniform|randint)\((.*)\)$")


def _scalar(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def parse_space(items: list[str]) -> dict[str, tuple[str, list[Any]]]:
    """'key=fn(a,b)' -> {key: (fn, [a, b])}; a malformed item is a ConfigError naming it."""
    space = {}
    for item in items:
        match = SPACE.match(item.replace(" ", ""))
        if match is None:
            raise ConfigError(
                f"--space {item!r} is not KEY=FN(ARGS) with FN one of choice, grid, uniform, "
                "loguniform, randint"
            )
        key, fn, args = (
            match.group(1),
            match.group(2),
            [_scalar(a) for a in match.group(3).split(",")],
        )
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if fn in ("uniform", "loguniform", "randint") and (len(args) != 2 or not numeric):
            raise ConfigError(f"--space {item!r}: {fn} takes two numbers (low, high)")
        if fn in ("uniform", "loguniform", "randint") and not args[0] < args[1]:
            raise ConfigError(f"--space {item!r}: low must be below high")
        if fn == "loguniform" and args[0] <= 0:
            raise ConfigError(f"--space {item!r}: loguniform needs low > 0")
        space[key] = (fn, args)
    return space


def _values_to_check(fn: str, args: list[Any]) -> list[Any]:
    """Every choice, or the bounds of a range (randint's high is exclusive)."""
    if fn == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def _tune_domain(fn: str, args: list[Any]):
    from ray import tune

    if fn == "choice":
        return tune.choice(args)
    if fn == "grid":
        return tune.grid_search(args)
    return getattr(tune, fn)(*args)


def validate(recipe: str, file: Path | None, overrides: list[str], space: dict) -> DictConfig:
    """The base config, after composing it with every choice and bound of the space."""
    from .launcher import prepare

    cfg, _ = prepare(recipe, file, overrides)
    for key, (fn, args) in space.items():
        for value in _values_to_check(fn, args):
            prepare(recipe, file, [*overrides, f"{key}={value}"])
    if cfg.resume:
        raise ConfigError("resume= cannot be swept; start the sweep anew")
    return cfg


def _trial(
    config: dict[str, Any], recipe: str, file: Path | None, overrides: list[str], sweep_dir: str,
    uri: str, parent: str, metric: str,
) -> None:  # fmt: skip
    """One trial: a gradlane run on the cluster the sweep runs on; the records holding
    `metric` go to Tune (it rejects a report without the metric it optimises)."""
    from ray import tune

    from .launcher import launch, prepare

    trial = tune.get_context().get_trial_name()
    values = [f"{k}={v}" for k, v in config.items()]
    cfg, _ = prepare(
        recipe, file,
        [*overrides, *values, f"run.output_dir={sweep_dir}", f"run.name={trial}",
         f"tracking.uri={uri}"],
    )  # fmt: skip

    workers: dict[str, str] = {}

    def report(record: dict[str, Any]) -> None:
        if "placement_group" in record:
            workers[WORKERS_KEY] = record["placement_group"]
        elif metric in record:
            tune.report(record | workers)

    launch(cfg, show_progress=False, on_record=report, tags={"mlflow.parentRunId": parent})


def _free_workers(trial) -> None:
    """Remove the placement group of a trial's Ray Train workers if it is still there.

    When Tune stops a trial (ASHA, or an error) it kills the trial's actor mid-run, and
    with it the Train controller. Ray Train's own cleaner looks the controller up through
    the state API, which a Ray without its dashboard (the embedded one) does not serve, so
    the group would keep its CPUs and every later trial would wait for them forever."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table

    group = (trial.last_result or {}).get(WORKERS_KEY)
    if group and placement_group_table().get(group, {}).get("state") not in (None, "REMOVED"):
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))


def _callbacks():
    from ray import tune

    class FreeWorkers(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _free_workers(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            _free_workers(trial)

    return [FreeWorkers()]


def run_sweep(
    recipe: str,
    file: Path | None,
    overrides: list[str],
    space_items: list[str],
    samples: int,
    metric: str,
    mode: str,
    asha: bool = False,
    concurrent: int | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run the sweep; returns its directory and one row per trial, best first."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .cluster import check_capacity, start_ray
    from .tracking import Tracker, default_uri

    if mode not in ("min", "max"):
        raise ConfigError(f"--mode {mode!r} is not allowed; allowed: min, max")
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be >= 1")
    space = parse_space(space_items)
    if not space:
        raise ConfigError("give at least one --space KEY=FN(ARGS)")
    cfg = validate(recipe, file, overrides, space)

    name = cfg.run.name or f"tune-{recipe}-{datetime.now():%Y%m%d-%H%M%S}"
    sweep_dir = (Path(cfg.run.output_dir) / name).resolve()
    if sweep_dir.exists():
        raise ConfigError(f"run.name={name!r}: {sweep_dir} already exists")
    uri = cfg.tracking.uri or default_uri(Path(cfg.run.output_dir).resolve())
    if not uri.startswith("sqlite:"):
        Tracker.check(uri)
    started = start_ray(cfg)
    import ray

    try:
        check_capacity(cfg, embedded=started and not cfg.ray.address)
        sweep_dir.mkdir(parents=True)
        if uri.startswith("sqlite:"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        parent = Tracker.start(uri, cfg.tracking.experiment, name, sweep_dir)
        parent.log_params({f"space.{k}": f"{fn}{tuple(a)}" for k, (fn, a) in space.items()})
        parent.log_params({"recipe": recipe, "samples": samples, "metric": metric, "mode": mode})
        per_trial = cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + TRIAL_CPU
        concurrent = concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
        scheduler = None
        if asha:
            scheduler = ASHAScheduler(
                time_attr="step", max_t=cfg.run.steps + 1, grace_period=cfg.run.eval_every
            )
        trainable = tune.with_parameters(
            _trial, recipe=recipe, file=file, overrides=overrides, sweep_dir=str(sweep_dir),
            uri=uri, parent=parent.run_id, metric=metric,
        )  # fmt: skip
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"CPU": TRIAL_CPU}),
            param_space={k: _tune_domain(fn, a) for k, (fn, a) in space.items()},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=samples,
                scheduler=scheduler,
                max_concurrent_trials=concurrent,
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir / "ray"), callbacks=_callbacks()
            ),
        )
        grid = tuner.fit()
        rows = _rows(grid, sweep_dir, metric, mode)
        _close_children(rows)
        _finish_parent(parent, sweep_dir, rows, metric, cfg.tracking.finish_timeout_s)
        return sweep_dir, rows
    finally:
        if started:
            ray.shutdown()


def _rows(grid, sweep_dir: Path, metric: str, mode: str) -> list[dict[str, Any]]:
    from .runs import RUN_FILE, read_info

    rows = []
    for result in grid:
        history = result.metrics_dataframe
        best = None
        if history is not None and metric in history:
            series = history[metric].dropna()
            best = float(series.min() if mode == "min" else series.max()) if len(series) else None
        trial = Path(result.path).name
        runs = [p for p in sweep_dir.iterdir() if (p / RUN_FILE).exists()]
        run_dir = next((p for p in runs if p.name in trial), None)
        info = read_info(run_dir) if run_dir else {}
        rows.append(
            {
                "trial": run_dir.name if run_dir else trial,
                **{k: v for k, v in result.config.items()},
                metric: best,
                "step": (result.metrics or {}).get("step"),
                "status": info.get("status", "ERROR" if result.error else "?"),
                "run_dir": run_dir,
                "mlflow run": info.get("run_id", ""),
                "uri": info.get("tracking_uri", ""),
            }
        )
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0)))


def _close_children(rows: list[dict[str, Any]]) -> None:
    """A trial ASHA stopped was ended mid-run (its run still RUNNING, or KILLED by the
    launcher as Tune ended it): mark its run KILLED and say why."""
    from .runs import update_info
    from .tracking import _client

    for row in rows:
        if row["status"] in ("RUNNING", "KILLED") and row["mlflow run"]:
            client = _client(row["uri"])
            client.set_tag(row["mlflow run"], "gradlane.stopped_early", "asha")
            client.set_terminated(row["mlflow run"], "KILLED")
            update_info(row["run_dir"], status="KILLED")
            row["status"] = "KILLED (stopped early)"


def _finish_parent(parent, sweep_dir: Path, rows, metric: str, timeout_s: float) -> None:
    table = trials_table(rows, metric)
    (sweep_dir / "trials.txt").write_text(table + "\n")
    parent.log_artifact(sweep_dir / "trials.txt")
    best = rows[0] if rows and rows[0][metric] is not None else None
    if best is not None:
        parent.log_metrics(0, {f"best/{metric}": best[metric]})
        parent.set_tag("best_trial", str(best["trial"]))
    parent.finish("FINISHED", timeout_s)


def trials_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Trials, best first: sampled values, best metric, last step, status, MLflow run."""
    from .runs import text_table

    columns = [c for c in (rows[0] if rows else {}) if c not in ("run_dir", "uri")]
    return text_table(columns, rows)
