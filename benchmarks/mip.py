"""The MIP effect: one hypernetwork task trained with MIP vs the default parametrisation.

    flock /tmp/gradlane-bench.lock .venv/bin/python benchmarks/mip.py   # full run
    .venv/bin/python benchmarks/mip.py --quick                          # smoke run

Task (after Ortiz, Guttag, Dalca, ICLR 2024): a hypernetwork conditioned on a
loss hyperparameter. The primary network is an MLP (64-64-10, ReLU) on
scikit-learn's digits; the hyper-input lambda in [0, 1] is the label smoothing
of its cross entropy, drawn per batch. Every primary parameter is predicted by
a `gradlane.layers.HyperNet` (hidden 64-64, LeakyReLU), either

  * default: raw lambda in, theta = MLP(lambda) (kaiming init, zero biases), or
  * MIP: [cos(pi lambda / 2), sin(pi lambda / 2)] in, theta = theta_0 + delta,

with the same optimizer (Adam), batches and lambdas per seed. The tracked loss
is the training objective over all training images averaged over a lambda grid
(0, 0.2, ..., 1). For each seed, "steps to target" is the first evaluation at
which the trailing mean of 3 evaluations reaches the default run's final loss
(its mean over the last 3 evaluations). Writes `mip.json` and `mip.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradlane.layers import hypernetize

RESULTS = Path(__file__).resolve().parent / "results"
GRID = [i / 5 for i in range(6)]
KINDS = ("default", "mip")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The training 80% of the digits (a fixed permutation), pixels scaled to [0, 1]."""
    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0
    y = torch.tensor(raw.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train = order[: int(0.8 * len(y))]
    return x[train], y[train]


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    return F.cross_entropy(model(x, hyper=lam), y, label_smoothing=lam)


def train(kind: str, seed: int, args: argparse.Namespace, x, y) -> dict:
    """One run; returns its evaluation steps, losses and wall time."""
    torch.manual_seed(seed)
    primary = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = hypernetize(
        primary,
        "*",
        {"lam": 1},
        hidden=args.hidden,
        encoding="mip" if kind == "mip" else "none",
        residual=kind == "mip",
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches and lambdas for both
    steps, losses = [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        lam = torch.rand((), generator=gen).item()
        loss = objective(model, x[idx], y[idx], lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            with torch.no_grad():
                losses.append(statistics.fmean(objective(model, x, y, g).item() for g in GRID))
            steps.append(step)
    return {"steps": steps, "loss": losses, "seconds": time.perf_counter() - start}


def steps_to(run: dict, target: float, window: int = 3) -> int | None:
    """First evaluation step whose trailing mean over `window` evaluations is <= target."""
    loss = run["loss"]
    for i in range(len(loss)):
        if statistics.fmean(loss[max(0, i - window + 1) : i + 1]) <= target:
            return run["steps"][i]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 150 steps, 1 seed")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds, args.eval_every = 150, 1, 10
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    x, y = digits()

    rows = []
    for seed in range(args.seeds):
        runs = {kind: train(kind, seed, args, x, y) for kind in KINDS}
        target = statistics.fmean(runs["default"]["loss"][-3:])
        reach = {kind: steps_to(runs[kind], target) for kind in KINDS}
        ratio = reach["mip"] / reach["default"] if reach["mip"] and reach["default"] else None
        rows.append({"seed": seed, "target": target, "reach": reach, "ratio": ratio, "runs": runs})
        print(f"seed {seed}: target {target:.4f}, steps to target {reach}, ratio {ratio}")

    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    median = statistics.median(ratios) if len(ratios) == len(rows) else None
    command = "flock /tmp/gradlane-bench.lock .venv/bin/python " + shlex.join(
        ["benchmarks/mip.py", *sys.argv[1:]]
    )
    summary = {
        "command": command,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
        f"1-min load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "median_ratio": median,
        "target_met": median is not None and median <= 0.5,
        "seeds": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mip.json").write_text(json.dumps(summary, indent=1))
    (args.out / "mip.md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict) -> str:
    def fmt(v):
        return "not reached" if v is None else f"{v}"

    lines = [
        "| seed | loss at 10% of steps (default / MIP) | final loss (default / MIP) "
        "| default steps to target | MIP steps to target | MIP / default |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in s["seeds"]:
        d, m = r["runs"]["default"], r["runs"]["mip"]
        early = max(0, len(d["loss"]) // 10 - 1)
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['seed']} | {d['loss'][early]:.4f} / {m['loss'][early]:.4f} "
            f"| {d['loss'][-1]:.4f} / {m['loss'][-1]:.4f} "
            f"| {fmt(r['reach']['default'])} | {fmt(r['reach']['mip'])} | {ratio} |"
        )
    med = "n/a" if s["median_ratio"] is None else f"{s['median_ratio']:.2f}"
    status = "met" if s["target_met"] else "NOT met"
    return "\n".join(
        [
            "### MIP vs default hypernetwork parametrisation (digits, label-smoothing hyper-input)",
            "",
            *lines,
            "",
            f"Median MIP / default steps to the default's final loss: **{med}** "
            f"(target <= 0.5: {status}).",
            "",
            f"Command: `{s['command']}`  ",
            f"Machine: {s['machine']}",
            "",
        ]
    )


if __name__ == "__main__":
    main()
