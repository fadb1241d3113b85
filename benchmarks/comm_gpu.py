"""Comm hooks on one GPU: what the hooks' own work costs (issue 12, item 9).

    python benchmarks/comm_gpu.py --out DIR                # about 60 s on one H200
    python benchmarks/comm_gpu.py --device cpu --layers 2 --width 256 --batch 64 --out DIR

World size 1 over NCCL, a stack of 24 Linear(4096, 4096) + ReLU layers (403M
parameters) at batch 4096: the all-reduce of one rank is nearly free, so what is
measured is the compression compute. Configurations, each on a fresh model:
compute only (no DDP), plain DDP, torch's PowerSGD hook at rank 4, and each of
ours. Before timing, every hook is checked against the oracle on two steps (L-GreCo:
its second decision step, the first that can change levels, and the next): at
world size 1 the mean is the gradient itself, so the applied gradient plus the
new residual must equal the true gradient (from autograd on the bare module)
plus the old residual; lossless settings (checked on a 2 x 256 stack) must give
the gradient itself. Step
time: CUDA events around forward, backward and an SGD step, over --steps steps
after --warmup; mean and median, and the ratio of the median to compute only's
(same run). Host syncs: the synchronising calls torch's CUDA sync debug mode
reports during --sync-steps steps (L-GreCo's decision steps sync by design, once
per `adjust_every`; they are timed but not among the sync steps).

Imports torch and gradlane's comm modules only (no Ray, MLflow, OmegaConf).
Writes comm_gpu.json and comm_gpu.md under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradlane.comm import register_comm_hook

LOSSLESS = ("PowerSGD lossless", "TopK 1.0", "QSGD 32 bit")
START = 2  # warm-up steps of plain all-reduce in every hook


def configs(rank: int) -> dict[str, dict | None]:
    """Label -> hook config (None: compute only, no DDP)."""
    lgreco = {"hook": "lgreco", "start_iter": START, "adjust_every": 10, "accumulate": 2}
    return {
        "compute only": None,
        "plain DDP": {"hook": "none"},
        f"torch PowerSGD r{rank}": {"hook": "torch_powersgd", "rank": rank, "start_iter": START},
        f"PowerSGD r{rank}": {"hook": "powersgd", "rank": rank, "start_iter": START},
        f"L-GreCo PowerSGD (r{rank})": lgreco | {"compressor": "powersgd", "rank": rank},
        "TopK 0.01": {"hook": "topk", "density": 0.01, "start_iter": START},
        "L-GreCo TopK (0.01)": lgreco | {"compressor": "topk", "density": 0.01},
        "QSGD 4 bit": {"hook": "qsgd", "bits": 4, "start_iter": START},
        "L-GreCo QSGD (4 bit)": lgreco | {"compressor": "qsgd", "bits": 4},
        "fp16": {"hook": "fp16"},
        "bf16": {"hook": "bf16"},
        # oracle checks only: settings that must return the gradient itself
        "PowerSGD lossless": {
            "hook": "powersgd",
            "rank": 256,
            "start_iter": 0,
            "min_compression_rate": 0.0,
        },  # fmt: skip
        "TopK 1.0": {"hook": "topk", "density": 1.0, "start_iter": 0},
        "QSGD 32 bit": {"hook": "qsgd", "bits": 32, "start_iter": 0},
    }


def build(args: argparse.Namespace) -> nn.Module:
    """The MLP stack, initialised on the device itself (403M parameters on a CPU take
    seconds to initialise)."""
    torch.manual_seed(0)
    with torch.device(args.device):
        layers = []
        for _ in range(args.layers):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        return nn.Sequential(*layers)


def run_one(label: str, cfg: dict | None, args: argparse.Namespace) -> dict:
    model = build(args)
    device = torch.device(args.device)
    net, hook = model, None
    if cfg is not None:
        ids = [device.index or 0] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids, bucket_cap_mb=args.bucket_cap_mb)
        hook = register_comm_hook(net, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, args.width, device=device, generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        opt.step()

    result: dict = {"config": label, "comm": cfg}
    state = getattr(hook, "state", None)
    for _ in range(START):
        step()
    controller = getattr(state, "controller", None)
    if controller is not None and len(controller.candidates) > 1:
        # L-GreCo's first decision keeps the default (nothing measured yet): check the
        # decision step that can change levels, and the step after it
        while controller.decisions < 1 or not controller.due(state.step):
            step()
    if hasattr(state, "errors"):
        checks = [_oracle_gap(model, net, opt, x, state) for _ in range(2)]
        levels = [str(v) for v in state.levels.values()]
        result["levels_at_check"] = {v: levels.count(v) for v in sorted(set(levels))}
        result["oracle_worst"] = max(checks, key=lambda c: c["gap"])
        result["oracle_gap"] = result["oracle_worst"]["gap"]
    if label in LOSSLESS:  # and nothing left behind: the gradient itself went through
        result["oracle_gap"] = max(
            result["oracle_gap"], *(float(e.abs().max()) for e in state.errors.values())
        )
        return result
    for _ in range(args.warmup):
        step()
    times = _timed(step, args.steps, device)
    result |= {
        "step_ms_mean": statistics.fmean(times),
        "step_ms_median": statistics.median(times),
        "step_ms": times,
    }
    if device.type == "cuda":
        result["host_syncs"] = _syncs(step, args.sync_steps, state)
    if hook is not None and hasattr(hook, "metrics"):
        metrics = hook.metrics()
        result["bytes_per_step"] = metrics.get("comm/bytes_per_step")
        result["dense_bytes_per_step"] = metrics.get("comm/dense_bytes_per_step")
    print(f"  {label:28s} median {result['step_ms_median']:.1f} ms", flush=True)
    return result


def _oracle_gap(model: nn.Module, net: nn.Module, opt, x: torch.Tensor, state) -> dict:
    """One hooked step; max over layers of |applied + e_new - g - e_old| / |g|_max (nan
    counts as inf), with what the worst layer looked like (to tell a lost gradient, gap
    1, from a wrong residual or output)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    truth = torch.autograd.grad(model(x).square().mean(), params)  # the bare module: no hook
    before = {n: state.errors[n].clone() for n in names if n in state.errors}
    step = state.step
    opt.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    worst = {"gap": 0.0}
    for n, p, g in zip(names, params, truth, strict=True):
        zero = torch.zeros_like(g)
        new, old = state.errors.get(n, zero), before.get(n, zero)
        gap = float((p.grad + new - g - old).abs().max() / g.abs().max().clamp_min(1e-30))
        gap = math.inf if math.isnan(gap) else gap
        if gap >= worst["gap"]:
            worst = {"gap": gap, "layer": n, "level": state.levels.get(n), "step": step}
            worst |= {
                key: float(t.abs().max())
                for key, t in (("g", g), ("applied", p.grad), ("e_old", old), ("e_new", new))
            }
    return worst


def _timed(step, steps: int, device: torch.device) -> list[float]:
    """Milliseconds per step (CUDA events on the GPU, wall clock on the CPU)."""
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            out.append(1000 * (time.perf_counter() - t0))
    return out


def _syncs(step, steps: int, state) -> int:
    """Synchronising CUDA calls during `steps` steps that are not L-GreCo decision steps."""
    controller = getattr(state, "controller", None)
    count = 0
    for _ in range(steps):
        while controller is not None and controller.due(state.step):
            step()  # a decision step: it reads the error table on purpose
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        count += sum("synchroniz" in str(w.message) for w in caught)
    return count


def markdown(report: dict) -> str:
    runs, meta = report["runs"], report["meta"]
    base = runs.get("compute only", {}).get("step_ms_median")
    lines = [
        "| configuration | step ms (median) | mean | x compute only | host syncs / step "
        "| oracle gap |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        if "failed" in r:
            lines.append(f"| {label} | failed: {r['failed']} | | | | |")
            continue
        if label in LOSSLESS:
            lines.append(f"| {label} (oracle only) | - | - | - | - | {r['oracle_gap']:.1e} |")
            continue
        ratio = f"{r['step_ms_median'] / base:.3f}x" if base else "-"
        syncs = f"{r['host_syncs'] / meta['sync_steps']:.1f}" if "host_syncs" in r else "-"
        gap = f"{r['oracle_gap']:.1e}" if "oracle_gap" in r else "-"
        lines.append(
            f"| {label} | {r['step_ms_median']:.1f} | {r['step_ms_mean']:.1f} | {ratio} "
            f"| {syncs} | {gap} |"
        )
    return "\n".join(
        [
            "# Comm hooks on one GPU: the hooks' own work",
            "",
            f"`{meta['command']}`",
            "",
            f"{meta['model']}, batch {meta['batch']}, world size 1 ({meta['backend']}), "
            f"bucket_cap_mb={meta['bucket_cap_mb']}; {meta['device_name']}, torch "
            f"{meta['torch']}. {meta['steps']} timed steps after {meta['warmup']} warm-up "
            "steps; target: every compressor at most 1.05x compute only (median).",
            "",
            *lines,
            "",
        ]
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for comm_gpu.json / .md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rank", type=int, default=4, help="PowerSGD rank (ours and torch's)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the checks")
    p.add_argument("--sync-steps", type=int, default=2, help="steps counted for host syncs")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--only", default="", help="comma-separated configuration labels")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.device == "cuda":  # set_device needs an index
        args.device = "cuda:0"
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(args.device))
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    labels = configs(args.rank)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        labels = {k: v for k, v in labels.items() if k in keep}
    runs = {}
    t0 = time.time()
    small = argparse.Namespace(**{**vars(args), "layers": 2, "width": 256, "batch": 256})
    for label, cfg in labels.items():
        try:  # the lossless checks on a small stack: full-rank PowerSGD is a big QR
            runs[label] = run_one(label, cfg, small if label in LOSSLESS else args)
        except Exception as exc:  # noqa: BLE001 - a configuration that fails is a result too
            runs[label] = {"config": label, "failed": f"{type(exc).__name__}: {exc}"}
            print(f"  {label:28s} failed: {exc}", flush=True)
        gc.collect()
        if backend == "nccl":
            torch.cuda.empty_cache()
    n_params = args.layers * (args.width + 1) * args.width
    report = {
        "runs": runs,
        "meta": {
            "command": "python benchmarks/comm_gpu.py " + " ".join(argv or []),
            "model": f"{args.layers} x Linear({args.width}, {args.width}) + ReLU "
            f"({n_params / 1e6:.0f}M parameters)",
            "batch": args.batch,
            "backend": backend,
            "bucket_cap_mb": args.bucket_cap_mb,
            "steps": args.steps,
            "warmup": args.warmup,
            "sync_steps": args.sync_steps,
            "device_name": torch.cuda.get_device_name()
            if backend == "nccl"
            else platform.machine(),
            "torch": torch.__version__,
            "wall_s": time.time() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
    }
    dist.destroy_process_group()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comm_gpu.json").write_text(json.dumps(report, indent=1))
    (args.out / "comm_gpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
