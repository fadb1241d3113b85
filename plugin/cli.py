"""`gradlane` command line: run, show, list, runs, sync.

    gradlane run RECIPE [-c FILE] [key=value ...]   merge, validate, print, train
    gradlane list                                   recipes, comm hooks, optimizers
    gradlane show RECIPE [key=value ...]            the resolved config as YAML
    gradlane tune RECIPE [key=value ...] --space KEY=FN(ARGS) ...   a Ray Tune sweep
    gradlane runs [DIR]                             runs under DIR (default: runs)
    gradlane sync RUN_DIR [--uri URI]               (re)send a run's directory to MLflow
    gradlane --version

Bad input prints one line naming the key, the value and what is allowed, and
exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'gradlane run: error: ... (see gradlane run --help)'."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradlane", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gradlane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a recipe on Ray and track it in MLflow")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.add_argument("-c", "--config", type=Path, help="a YAML file merged over the recipe's")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    show = sub.add_parser("show", help="print a recipe's resolved config")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument("-c", "--config", type=Path)
    sub.add_parser("list", help="recipes, comm hooks and optimizers")
    tune = sub.add_parser("tune", help="a Ray Tune sweep whose trials are gradlane runs")
    tune.add_argument("recipe")
    tune.add_argument("overrides", nargs="*", metavar="key=value")
    tune.add_argument("-c", "--config", type=Path)
    tune.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=FN(ARGS)",
        help="choice(a,b) grid(a,b) uniform(lo,hi) loguniform(lo,hi) randint(lo,hi)",
    )
    tune.add_argument("--samples", type=int, default=1, help="trials (per grid point)")
    tune.add_argument("--metric", default="val/loss")
    tune.add_argument("--mode", default="min", help="min or max")
    tune.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA)")
    tune.add_argument("--concurrent", type=int, help="trials at once (default: as CPUs allow)")
    sync = sub.add_parser("sync", help="(re)send a run's directory to MLflow")
    sync.add_argument("run_dir", type=Path)
    sync.add_argument("--uri", help="tracking URI to send to (default: the run's own)")
    runs = sub.add_parser("runs", help="list the runs in a directory (default: runs)")
    runs.add_argument("directory", nargs="?", type=Path, default=Path("runs"))
    return parser


def _list() -> str:
    from gradlane.comm import COMM_HOOKS
    from gradlane.optim import OPTIMIZERS
    from gradlane.recipes import RECIPES

    out = []
    for title, registry in (("recipes", RECIPES), ("comm hooks", COMM_HOOKS),
                            ("optimizers", OPTIMIZERS)):  # fmt: skip
        out.append(f"{title}:")
        for name in registry.names():
            entry = registry.entry(name)
            try:
                text = entry.summary()
            except (ImportError, AttributeError) as exc:
                text = f"(cannot be loaded: {exc})"
            origin = "" if entry.origin == "built-in" else f"  [{entry.origin}]"
            out.append(f"  {name:<16} {text}{origin}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("run", "show", "tune")
    if extra and (not takes_overrides or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides that came after an option
        args.overrides += extra
    try:
        if args.command == "list":
            print(_list())
            return 0
        if args.command == "tune":
            from .tune import run_sweep, trials_table

            sweep_dir, rows = run_sweep(
                args.recipe, args.config, list(args.overrides), args.space, args.samples,
                args.metric, args.mode, args.asha, args.concurrent,
            )  # fmt: skip
            print(f"sweep {sweep_dir}, best first:\n{trials_table(rows, args.metric)}")
            return 0
        if args.command == "sync":
            from .tracking import sync

            uri, run_id = sync(args.run_dir, args.uri)
            print(f"synced {args.run_dir} to {uri} (MLflow run {run_id})")
            return 0
        if args.command == "runs":
            from .runs import list_runs, runs_table

            if not args.directory.is_dir():
                raise ConfigError(f"runs directory {str(args.directory)!r} does not exist")
            print(runs_table(list_runs(args.directory)))
            return 0
        from .config import to_yaml
        from .launcher import prepare

        cfg, checkpoint = prepare(args.recipe, args.config, list(args.overrides))
        if args.command == "show":
            print(to_yaml(cfg), end="")
            return 0
        from .launcher import TrainingFailed, launch, summary_table

        print(to_yaml(cfg), end="", flush=True)
        try:
            result = launch(cfg, checkpoint, show_progress=not args.no_progress)
        except TrainingFailed as exc:
            print(f"gradlane: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(summary_table(result))
        return 0
    except ConfigError as exc:
        print(f"gradlane: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("gradlane: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
