"""M-FAC benchmark: step time, window memory, sharded memory, and quality on the lm recipe.

    /work/bin/cpu-run bench .venv/bin/python benchmarks/mfac.py       # full CPU run
    .venv/bin/python benchmarks/mfac.py --quick                         # smoke test
    python benchmarks/mfac.py --device cuda --out DIR                   # GPU mode (~30 s)

Measured side by side in one process (ratios, not absolute times, are the result):

* step time of MFAC (fp32 and bf16 window) against AdamW, against a straightforward
  O(dm + m^3) M-FAC that refactors the m x m system every step, and against the
  memory-bandwidth floor: one matrix-vector product and one transposed product over an
  fp32 tensor the size of the window (the two passes any window algorithm must make).
  The window is pre-filled with m synthetic gradients (disjoint random blocks, so the
  Gram matrix is exactly diagonal) so the m warm-up steps are not timed; the step that
  ends a lap of the window (an O(m^3) refactorisation) is timed separately and
  amortised over the lap;
* the same for the parameter list of the lm recipe's GPT (many tensors, not one flat
  one): MFAC gathers the gradient with one cat and applies the update with foreach ops;
* window memory per rank, dense and with `shard_window=True` on 2 gloo processes;
* validation loss of the lm recipe's GPT after a fixed number of steps for MFAC, AdamW
  and SGD, each over a small learning-rate sweep and 2 seeds (single process).

`--device cuda` runs the step-time part only, at d=1e6 / m=1024, d=16e6 / m=256 and a
larger GPT's parameter list, timed with CUDA events, and both bf16 kernels (matrix
products with fp32 output, and fp32 tiles); it imports only torch and gradlane's
optimizers (the GPT is loaded from its file), so it needs no Ray, MLflow or OmegaConf.

Writes mfac.json and mfac.md (GPU mode: mfac_gpu.json and mfac_gpu.md) under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import cpu_model

from gradlane.optimizers import MFAC, window

RESULTS = Path(__file__).resolve().parent / "results"
DAMP = 1e-4


def lm_model_class():
    """The lm recipe's GPT, loaded from its file: the recipe package imports OmegaConf."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "lm" / "model.py"
    spec = importlib.util.spec_from_file_location("gradlane_lm_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- step time


def _gradients(d: int, count: int, seed: int, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(d, generator=gen) / math.sqrt(d)).to(device) for _ in range(count)]


def _prefill(opt: MFAC, params: list[torch.Tensor], seed: int) -> None:
    """Give `opt` a full window of m unit-norm gradients with an exactly diagonal Gram matrix."""
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad.view(-1)[0] = 1.0
    opt.step()  # creates the state
    state = opt.state["mfac"]
    rows = state["rows"]
    m, n = rows.shape
    width = n // m
    gen = torch.Generator(rows.device).manual_seed(seed)
    rows.zero_()
    for i in range(m):
        block = torch.randn(width, generator=gen, device=rows.device) / math.sqrt(width)
        rows[i, i * width : (i + 1) * width] = block.to(rows.dtype)
    sq = torch.stack([r.double().pow(2).sum() for r in rows])  # no fp64 copy of the window
    state["gram"] = torch.diag(sq)
    state["inv"] = torch.diag(1.0 / (m * opt.damp + sq))
    state["count"] = m


class Resolve:
    """The straightforward O(dm + m^3) step: the same window, K refactored every step.

    u = (g - G^T K^{-1} G g) / damp with K = m*damp*I + G G^T (Woodbury), K factored
    by Cholesky in fp64 (the precision MFAC's m x m algebra uses).
    """

    def __init__(self, rows: torch.Tensor, gram: torch.Tensor, damp: float, lr: float):
        self.rows, self.gram, self.damp, self.lr = rows, gram.clone(), damp, lr
        self.count = rows.shape[0]

    def step(self, p: torch.Tensor, g: torch.Tensor) -> None:
        m = self.rows.shape[0]
        j = self.count % m
        h = torch.mv(self.rows, g).double()
        h[j] = torch.dot(g, g).double()
        self.gram[j, :] = h
        self.gram[:, j] = h
        self.rows[j] = g
        K = self.gram + m * self.damp * torch.eye(m, dtype=torch.float64)
        chol = torch.linalg.cholesky(K)
        c = torch.cholesky_solve(h[:, None], chol)[:, 0]
        update = (g - torch.mv(self.rows.T, c.float())) / self.damp
        p.add_(update, alpha=-self.lr)
        self.count += 1


class _Recorder:
    """Times named variants into one result dict, cycling through a small gradient pool."""

    def __init__(self, d: int, m: int, budget_s: float, rounds: int, device="cpu"):
        self.device = torch.device(device)
        self.pool = _gradients(d, 4, seed=1, device=self.device)
        self.calls = 0
        self.budget_s, self.rounds = budget_s, rounds
        self.out: dict = {"d": d, "m": m, "reps": {}}
        self.samples: dict[str, list[float]] = {}

    def grad(self) -> torch.Tensor:
        self.calls += 1
        return self.pool[self.calls % len(self.pool)]

    def timed(self, fn, reps: int = 1) -> float:
        """Seconds per call of `fn` over `reps` calls, the device's queue drained around them."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(self.device)
        return (time.perf_counter() - start) / reps

    def record(self, **variants) -> None:
        """Median ms per call of each variant; rounds interleaved, so load drifts hit all."""
        reps = {}
        for name, fn in variants.items():
            once = self.timed(fn)
            reps[name] = max(2, min(50, int(self.budget_s / self.rounds / max(once, 1e-6))))
        for _ in range(self.rounds):
            for name, fn in variants.items():
                self.samples.setdefault(name, []).append(self.timed(fn, reps[name]))
        for name in variants:
            self.out[name] = 1e3 * statistics.median(self.samples[name])
            self.out["reps"][name] = self.out["reps"].get(name, 0) + reps[name] * self.rounds


def _floor(rows: torch.Tensor, x: torch.Tensor):
    """The two passes any window algorithm makes: G x and G^T c over an fp32 window."""
    coef = torch.randn(rows.shape[0], device=rows.device)

    def floor():
        torch.mv(rows, x)
        torch.mv(rows.T, coef)

    return floor


def _time_fp32(rec: _Recorder, d: int, m: int, resolve: bool = True) -> None:
    """MFAC with an fp32 window, the two-pass floor and (CPU) the re-solve, on one window."""
    p = torch.zeros(d, requires_grad=True, device=rec.device)
    opt = MFAC([p], lr=1e-3, ngrads=m, damp=DAMP)
    _prefill(opt, [p], seed=2)
    rows = opt.state["mfac"]["rows"]
    rec.out["window_bytes_fp32"] = rows.numel() * rows.element_size()
    rec.out["mxm_bytes"] = 2 * m * m * 8

    def mfac_step():
        p.grad = rec.grad()
        opt.step()

    floor = _floor(rows, rec.pool[0])
    rec.record(floor=floor, mfac_fp32=mfac_step)
    # the step that closes a lap refactors K (O(m^3)); it happens once every m steps
    lap_end = []
    for _ in range(2):
        opt.state["mfac"]["count"] = 2 * m - 1
        lap_end.append(rec.timed(mfac_step))
    typical = rec.out["mfac_fp32"]
    rec.out["mfac_fp32_lap_end"] = 1e3 * min(lap_end)
    rec.out["mfac_fp32_amortised"] = typical + (rec.out["mfac_fp32_lap_end"] - typical) / m
    assert opt.skipped_steps == 0, "benchmark gradients were rejected"
    if resolve:
        solver = Resolve(rows, opt.state["mfac"]["gram"], DAMP, lr=1e-3)
        # the re-solve rewrites the window: timed after MFAC, interleaved with the floor again
        rec.record(floor=floor, resolve=lambda: solver.step(p.detach(), rec.grad()))


def _time_adamw(rec: _Recorder, d: int) -> None:
    q = torch.zeros(d, requires_grad=True, device=rec.device)
    adamw = torch.optim.AdamW([q], lr=1e-3)

    def adamw_step():
        q.grad = rec.grad()
        adamw.step()

    rec.record(adamw=adamw_step)


def _time_bf16(rec: _Recorder, d: int, m: int, kernels: tuple[str, ...] = ("",)) -> None:
    """MFAC with a bf16 window; on a GPU once per low-precision kernel ("mm", "tiles")."""
    p = torch.zeros(d, requires_grad=True, device=rec.device)
    opt = MFAC([p], lr=1e-3, ngrads=m, damp=DAMP, window_dtype="bfloat16")
    _prefill(opt, [p], seed=2)
    rows = opt.state["mfac"]["rows"]
    rec.out["window_bytes_bf16"] = rows.numel() * rows.element_size()

    def mfac_step():
        p.grad = rec.grad()
        opt.step()

    saved = dict(window.LOW_PRECISION_KERNEL)
    try:
        for kernel in kernels:
            if kernel:
                window.LOW_PRECISION_KERNEL[rec.device.type] = kernel
            rec.record(**{"mfac_bf16" + (f"_{kernel}" if kernel else ""): mfac_step})
    finally:
        window.LOW_PRECISION_KERNEL.clear()
        window.LOW_PRECISION_KERNEL.update(saved)
    assert opt.skipped_steps == 0, "benchmark gradients were rejected"


def step_times(d: int, m: int, budget_s: float, rounds: int) -> dict:
    """Median step times (ms) at one size on the CPU; one window alive at a time."""
    rec = _Recorder(d, m, budget_s, rounds)
    _time_fp32(rec, d, m)
    _time_adamw(rec, d)
    _time_bf16(rec, d, m)
    return rec.out


def gpu_step_times(d: int, m: int, budget_s: float, rounds: int, device: str) -> dict:
    """fp32 MFAC vs the floor, AdamW, and the bf16 window with both kernels, on a GPU."""
    rec = _Recorder(d, m, budget_s, rounds, device)
    _time_fp32(rec, d, m, resolve=False)
    _time_adamw(rec, d)
    torch.cuda.empty_cache()  # the fp32 window is gone
    _time_bf16(rec, d, m, kernels=("mm", "tiles"))
    torch.cuda.empty_cache()
    rec.out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rec.out


def param_list_times(model_cfg: dict, m: int, budget_s: float, rounds: int, device="cpu") -> dict:
    """MFAC on the lm GPT's parameter list (many tensors) vs the floor over its window."""
    model = lm_model_class()(**model_cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    rec = _Recorder(d, m, budget_s, rounds, device)
    rec.out.update(model=model_cfg, tensors=len(params))
    sizes = [p.numel() for p in params]

    def set_grads():
        for p, g in zip(params, rec.grad().split(sizes), strict=True):
            p.grad = g.view_as(p)

    adamw = torch.optim.AdamW(params, lr=1e-3)
    for dtype in ("float32", "bfloat16"):
        opt = MFAC(params, lr=1e-3, ngrads=m, damp=DAMP, window_dtype=dtype)
        _prefill(opt, params, seed=2)
        short = "fp32" if dtype == "float32" else "bf16"

        def step(opt=opt):
            set_grads()
            opt.step()

        variants = {f"mfac_{short}": step}
        if dtype == "float32":
            variants["floor"] = _floor(opt.state["mfac"]["rows"], rec.pool[0])
            variants["adamw"] = lambda: (set_grads(), adamw.step())
        rec.record(**variants)
        assert opt.skipped_steps == 0, "benchmark gradients were rejected"
        del opt
    return rec.out


# ----------------------------------------------------------------------- sharded memory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_rank(rank, world, port, d, m, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    p = torch.zeros(d, requires_grad=True)
    opt = MFAC([p], lr=1e-3, ngrads=m, damp=DAMP, shard_window=True)
    grads = _gradients(d, m + 4, seed=3)  # the same gradients on both ranks, as after DDP
    times = []
    for g in grads:
        p.grad = g
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state = opt.state["mfac"]
    result = {
        "rank": rank,
        "window_bytes": state["rows"].numel() * state["rows"].element_size(),
        "window_columns": state["rows"].shape[1],
        "mxm_bytes": (state["gram"].numel() + state["inv"].numel()) * 8,
        "step_ms_full_window": 1e3 * statistics.median(times[m:]),
        "param_checksum": float(p.detach().double().sum()),
    }
    torch.save(result, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def sharded_memory(d: int, m: int, world: int = 2) -> dict:
    """Per-rank window bytes with shard_window=True on `world` gloo processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_sharded_rank, args=(world, _free_port(), d, m, out_dir), nprocs=world)
        ranks = [torch.load(Path(out_dir) / f"{r}.pt") for r in range(world)]
    p = torch.zeros(d, requires_grad=True)
    dense = MFAC([p], lr=1e-3, ngrads=m, damp=DAMP)
    times = []
    for g in _gradients(d, m + 4, seed=3):
        p.grad = g
        start = time.perf_counter()
        dense.step()
        times.append(time.perf_counter() - start)
    rows = dense.state["mfac"]["rows"]
    return {
        "d": d,
        "m": m,
        "world": world,
        "dense_window_bytes": rows.numel() * rows.element_size(),
        "dense_step_ms_full_window": 1e3 * statistics.median(times[m:]),
        "dense_param_checksum": float(p.detach().double().sum()),
        "ranks": ranks,
    }


# -------------------------------------------------------------------------- lm quality


def lm_run(cfg: dict, seed: int, steps: int, model_cfg: dict, corpus, val) -> dict:
    from gradlane import build_optimizer, build_scheduler
    from gradlane.recipes.lm.data import random_batch
    from gradlane.recipes.lm.model import GPT

    torch.manual_seed(seed)
    model = GPT(**model_cfg)
    opt = build_optimizer(cfg, model.parameters())
    sched = build_scheduler(
        {"schedule": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1}, opt, steps
    )
    gen = torch.Generator().manual_seed(1000 + seed)
    length = model_cfg["context"] + 1
    start = time.perf_counter()
    train_loss = float("nan")
    for _ in range(steps):
        loss = model.loss(random_batch(corpus.train, 16, length, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        train_loss = loss.item()
        if not math.isfinite(train_loss):
            break
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val_loss = sum(model.loss(b).item() for b in val) / len(val)
    return {"val_loss": val_loss if math.isfinite(train_loss) else float("nan"), "seconds": seconds}


def lm_quality(steps: int, seeds: list[int], sweeps: dict, model_cfg: dict) -> dict:
    from gradlane.recipes.lm.data import eval_batches, load_corpus

    corpus = load_corpus(max_bytes=2_000_000)
    val = eval_batches(corpus.val, 32, model_cfg["context"] + 1, 8)
    runs = []
    for name, (base, lrs) in sweeps.items():
        for lr in lrs:
            for seed in seeds:
                cfg = {"name": name, **base, "lr": lr}
                result = lm_run(cfg, seed, steps, model_cfg, corpus, val)
                runs.append({"optimizer": name, "lr": lr, "seed": seed, **result})
                print(
                    f"  lm {name} lr={lr:g} seed={seed}: val {result['val_loss']:.4f}", flush=True
                )
    best = {}
    for name in sweeps:
        by_lr = {}
        for r in runs:
            if r["optimizer"] == name:
                by_lr.setdefault(r["lr"], []).append(r["val_loss"])
        means = {lr: statistics.mean(v) for lr, v in by_lr.items()}
        lr = min(means, key=lambda k: means[k] if math.isfinite(means[k]) else math.inf)
        per_step = [r["seconds"] / steps for r in runs if r["optimizer"] == name]
        best[name] = {
            "lr": lr,
            "val_loss": means[lr],
            "ms_per_step": 1e3 * statistics.mean(per_step),
        }
    return {
        "steps": steps,
        "seeds": seeds,
        "model": model_cfg,
        "settings": sweeps,
        "runs": runs,
        "best": best,
    }


# ------------------------------------------------------------------------------ report


def targets(result: dict) -> dict:
    by_size = {(r["d"], r["m"]): r for r in result["step_time"]}
    out = {}
    small, big = by_size.get((10_000, 1024)), by_size.get((1_000_000, 1024))
    if small:
        ratio = small["mfac_fp32_amortised"] / small["resolve"]
        out["d=1e4, m=1024: MFAC step <= 0.3x re-solve"] = {"value": ratio, "met": ratio <= 0.3}
    if big:
        ratio = big["mfac_fp32_amortised"] / big["floor"]
        out["d=1e6, m=1024: fp32 MFAC <= 1.2x two-pass floor"] = {
            "value": ratio,
            "met": ratio <= 1.2,
        }
        ratio = big["mfac_bf16"] / big["floor"]
        out["d=1e6, m=1024: bf16 MFAC <= 0.6x fp32 floor"] = {"value": ratio, "met": ratio <= 0.6}
    sh = result["sharded"]
    ratio = max(r["window_bytes"] for r in sh["ranks"]) / sh["dense_window_bytes"]
    out[f"sharded window per rank <= 1/{sh['world']} of dense"] = {
        "value": ratio,
        "met": ratio <= 1 / sh["world"] + 1 / sh["d"],
    }
    lm = result["lm"]
    if "mfac" in lm["best"] and "adamw" in lm["best"]:
        spread = {}
        for name in ("mfac", "adamw"):
            vals = [
                r["val_loss"]
                for r in lm["runs"]
                if r["optimizer"] == name and r["lr"] == lm["best"][name]["lr"]
            ]
            spread[name] = max(vals) - min(vals)
        gap = lm["best"]["adamw"]["val_loss"] - lm["best"]["mfac"]["val_loss"]
        out["lm: best MFAC below best AdamW at equal steps (loss gap)"] = {
            "value": gap,
            "met": gap > 0,
            "note": f"seed spread at the best lr: MFAC {spread['mfac']:.3f}, "
            f"AdamW {spread['adamw']:.3f}; the gap is "
            + ("larger than" if abs(gap) > max(spread.values()) else "within")
            + " that seed noise",
        }
    return out


def param_list_table(r: dict) -> list[str]:
    model = r["model"] or "the lm recipe default (4 layers, width 128)"
    return [
        "",
        f"## The lm GPT's parameter list ({r['tensors']} tensors, d={r['d']:,}, m={r['m']})",
        "",
        "| model | AdamW | floor | MFAC fp32 | MFAC bf16 | fp32/floor | bf16/floor |",
        "|---|---|---|---|---|---|---|",
        f"| {model} | {r['adamw']:.2f} | {r['floor']:.2f} | {r['mfac_fp32']:.2f} | "
        f"{r['mfac_bf16']:.2f} | {r['mfac_fp32'] / r['floor']:.2f} | "
        f"{r['mfac_bf16'] / r['floor']:.2f} |",
    ]


def markdown(result: dict) -> str:
    lines = [
        "# M-FAC benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} torch thread(s), "
        f"torch {result['machine']['torch']}; wall time {result['seconds'] / 60:.1f} min.",
        "",
        "## Step time (ms, median) and window memory",
        "",
        "floor = one matrix-vector and one transposed product over an fp32 (m, d) tensor. "
        "MFAC = a step with a full window (amortised: plus 1/m of the lap-end O(m^3) "
        "refactorisation). re-solve = the same algorithm refactoring K every step.",
        "",
        "| d | m | AdamW | floor | MFAC fp32 | MFAC fp32 amortised | re-solve | MFAC bf16 "
        "| MFAC/re-solve | MFAC/floor | bf16/floor | window fp32 | window bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["step_time"]:
        lines.append(
            f"| {r['d']:.0e} | {r['m']} | {r['adamw']:.2f} | {r['floor']:.2f} | "
            f"{r['mfac_fp32']:.2f} | {r['mfac_fp32_amortised']:.2f} | {r['resolve']:.2f} | "
            f"{r['mfac_bf16']:.2f} | {r['mfac_fp32_amortised'] / r['resolve']:.2f} | "
            f"{r['mfac_fp32_amortised'] / r['floor']:.2f} | {r['mfac_bf16'] / r['floor']:.2f} | "
            f"{r['window_bytes_fp32'] / 2**20:.0f} MiB | {r['window_bytes_bf16'] / 2**20:.0f} MiB |"
        )
    lines += param_list_table(result["param_list"])
    sh = result["sharded"]
    lines += [
        "",
        f"## Sharded window, {sh['world']} gloo ranks (d={sh['d']:.0e}, m={sh['m']})",
        "",
        "| | window bytes | columns | m x m bytes | step ms (full window) |",
        "|---|---|---|---|---|",
        f"| dense (1 process) | {sh['dense_window_bytes'] / 2**20:.1f} MiB | {sh['d']} | "
        f"{2 * sh['m'] ** 2 * 8 / 2**20:.1f} MiB | {sh['dense_step_ms_full_window']:.1f} |",
    ]
    for r in sh["ranks"]:
        lines.append(
            f"| rank {r['rank']} | {r['window_bytes'] / 2**20:.1f} MiB | {r['window_columns']} | "
            f"{r['mxm_bytes'] / 2**20:.1f} MiB | {r['step_ms_full_window']:.1f} |"
        )
    lm = result["lm"]
    lines += [
        "",
        f"## lm quality: validation loss after {lm['steps']} steps "
        f"(GPT {lm['model']}, batch 16, cosine schedule, seeds {lm['seeds']})",
        "",
        "| optimizer | settings | lr | "
        + " | ".join(f"seed {s}" for s in lm["seeds"])
        + " | mean |",
        "|---|---|---|" + "---|" * (len(lm["seeds"]) + 1),
    ]
    table: dict = {}
    for r in lm["runs"]:
        table.setdefault((r["optimizer"], r["lr"]), {})[r["seed"]] = r["val_loss"]
    for (name, lr), seeds in table.items():
        settings = ", ".join(f"{k}={v}" for k, v in lm["settings"][name][0].items())
        vals = [seeds[s] for s in lm["seeds"]]
        lines.append(
            f"| {name} | {settings} | {lr:g} | "
            + " | ".join(f"{v:.4f}" for v in vals)
            + f" | {statistics.mean(vals):.4f} |"
        )
    lines += ["", "Best learning rate per optimizer (mean over seeds):", ""]
    lines += ["| optimizer | lr | val loss | ms / step |", "|---|---|---|---|"]
    for name, b in lm["best"].items():
        lines.append(f"| {name} | {b['lr']:g} | {b['val_loss']:.4f} | {b['ms_per_step']:.1f} |")
    lines += ["", "## Targets", "", "| target | measured | met | note |", "|---|---|---|---|"]
    for name, t in result["targets"].items():
        met = "yes" if t["met"] else "no"
        lines.append(f"| {name} | {t['value']:.3f} | {met} | {t.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per timed variant")
    parser.add_argument("--lm-steps", type=int, default=600)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: step times only")
    parser.add_argument(
        "--out",
        type=Path,
        help="where mfac.json/md go (default benchmarks/results; --quick: a temp dir)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        return gpu_main(args)
    began = time.perf_counter()

    if args.quick:
        sizes, budget, rounds = [(10_000, 16), (20_000, 64)], 0.2, 2
        shard = (20_000, 8)
        steps, seeds = 20, [0]
        sweeps = {
            "adamw": ({"weight_decay": 0.0}, [3e-3]),
            "sgd": ({"momentum": 0.9}, [0.3]),
            "mfac": ({"ngrads": 8, "damp": 1e-2, "momentum": 0.9}, [3e-3]),
        }
        model_cfg = {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 32}
        params_cfg, params_m = model_cfg, 8
    else:
        sizes = [(d, m) for d in (10_000, 100_000, 1_000_000) for m in (256, 1024)]
        budget, rounds = args.budget, 3
        shard = (1_000_000, 256)
        steps, seeds = args.lm_steps, [0, 1]
        sweeps = {
            "adamw": ({"weight_decay": 0.0}, [1e-3, 3e-3, 1e-2]),
            "sgd": ({"momentum": 0.9}, [0.1, 0.3, 1.0]),
            "mfac": ({"ngrads": 128, "damp": 1e-2, "momentum": 0.9}, [1e-3, 3e-3, 1e-2]),
        }
        model_cfg = {"n_layer": 2, "n_head": 4, "d_model": 64, "context": 64}
        params_cfg, params_m = {}, 64  # the lm recipe's GPT as configured: 4 layers, width 128

    result: dict = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "damp": DAMP,
        "step_time": [],
    }
    for d, m in sizes:
        print(f"step time d={d} m={m}", flush=True)
        result["step_time"].append(step_times(d, m, budget, rounds))
    print(f"lm GPT parameter list, m={params_m}", flush=True)
    result["param_list"] = param_list_times(params_cfg, params_m, budget, rounds)
    print(f"sharded memory d={shard[0]} m={shard[1]}", flush=True)
    result["sharded"] = sharded_memory(*shard)
    print("lm quality", flush=True)
    result["lm"] = lm_quality(steps, seeds, sweeps, model_cfg)
    result["seconds"] = time.perf_counter() - began
    result["targets"] = targets(result)

    out = args.out or (
        Path(tempfile.gettempdir()) / "gradlane-mfac-quick" if args.quick else RESULTS
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "mfac.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = markdown(result)
    (out / "mfac.md").write_text(report)
    print(report)
    print(f"wrote {out / 'mfac.json'} and {out / 'mfac.md'}")
    return result


GPU_SIZES = [(1_000_000, 1024), (16_000_000, 256)]
GPU_GPT = {"n_layer": 16, "n_head": 8, "d_model": 256, "context": 256}  # 197 tensors, 12.7M


def gpu_main(args: argparse.Namespace) -> dict:
    """Step times on a GPU: fp32 / bf16 windows vs the two-pass floor; writes mfac_gpu.*."""
    device = torch.device(args.device)
    began = time.perf_counter()
    budget, rounds = (0.2, 2) if args.quick else (1.0, 3)
    sizes = [(100_000, 64)] if args.quick else GPU_SIZES
    gpt, gpt_m = (({"n_layer": 2, "n_head": 2, "d_model": 32}, 8) if args.quick
                  else (GPU_GPT, 256))  # fmt: skip
    result: dict = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"device": torch.cuda.get_device_name(device), "torch": torch.__version__},
        "damp": DAMP,
        "step_time": [],
    }
    for d, m in sizes:
        print(f"step time d={d} m={m} on {device}", flush=True)
        result["step_time"].append(gpu_step_times(d, m, budget, rounds, args.device))
    print(f"lm GPT parameter list {gpt}, m={gpt_m}", flush=True)
    result["param_list"] = param_list_times(gpt, gpt_m, budget, rounds, args.device)
    result["seconds"] = time.perf_counter() - began
    result["targets"] = {}
    for r in result["step_time"]:
        size = f"d={r['d']:.0e}, m={r['m']}"
        ratio = r["mfac_fp32_amortised"] / r["floor"]
        result["targets"][f"{size}: fp32 MFAC <= 1.1x floor"] = {
            "value": ratio,
            "met": ratio <= 1.1,
        }
        ratio = r["mfac_bf16_mm"] / r["floor"]
        result["targets"][f"{size}: bf16 MFAC <= 0.6x fp32 floor"] = {
            "value": ratio,
            "met": ratio <= 0.6,
        }
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "mfac_gpu.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = gpu_markdown(result)
    (out / "mfac_gpu.md").write_text(report)
    print(report)
    print(f"wrote {out / 'mfac_gpu.json'} and {out / 'mfac_gpu.md'}")
    return result


def gpu_markdown(result: dict) -> str:
    lines = [
        "# M-FAC benchmark, GPU",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['machine']['device']}, torch {result['machine']['torch']}; "
        f"wall time {result['seconds']:.0f} s.",
        "",
        "ms per step (CUDA, median of interleaved rounds). floor = G x and G^T c over an fp32 "
        "window; bf16 mm = half-precision products with fp32 output, tiles = converted to "
        "fp32 tile by tile.",
        "",
        "| d | m | AdamW | floor | MFAC fp32 (amortised) | bf16 mm | bf16 tiles "
        "| fp32/floor | bf16 mm/floor | bf16 tiles/floor | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["step_time"]:
        lines.append(
            f"| {r['d']:.0e} | {r['m']} | {r['adamw']:.2f} | {r['floor']:.2f} | "
            f"{r['mfac_fp32_amortised']:.2f} | {r['mfac_bf16_mm']:.2f} | "
            f"{r['mfac_bf16_tiles']:.2f} | {r['mfac_fp32_amortised'] / r['floor']:.2f} | "
            f"{r['mfac_bf16_mm'] / r['floor']:.2f} | {r['mfac_bf16_tiles'] / r['floor']:.2f} | "
            f"{r['peak_gib']:.1f} |"
        )
    lines += param_list_table(result["param_list"])
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
