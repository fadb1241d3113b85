"""EvoNorm forward+backward time and memory: ours vs timm's vs BatchNorm2d+ReLU, on CPU.

    flock /tmp/gradlane-bench.lock .venv/bin/python benchmarks/evonorm.py   # full run
    .venv/bin/python benchmarks/evonorm.py --quick                          # smoke run

For an input of `--shape` (default 32x64x56x56, fp32), contiguous and
channels-last, with 1 and with all torch threads, each layer runs forward +
backward with a preallocated gradient.
Time: the median over `--repeat` rounds, the layers taking turns within each
round so that load on a shared machine hits them alike. Memory, from the torch
profiler's allocation events: the peak of bytes allocated during forward +
backward (the output and the input's gradient included), and the bytes still
held after the forward beyond the output (what autograd saved for backward). Target: ours at
most 0.5x timm's time and peak memory. Writes `evonorm.json` and `evonorm.md`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from gradlane.layers import EvoNormB0, EvoNormS0

RESULTS = Path(__file__).resolve().parent / "results"
CL = torch.channels_last
MB = 2**20


def timm_evo_norm():
    """timm.layers.evo_norm without timm's package __init__ (which needs torchvision):
    namespace stubs for timm / timm.models / timm.data and a placeholder
    torchvision.ops.misc only while importing (as tests/test_evonorm.py does)."""
    root = importlib.util.find_spec("timm").submodule_search_locations[0]
    for name, sub in (("timm", ""), ("timm.models", "/models"), ("timm.data", "/data")):
        mod = sys.modules.setdefault(name, types.ModuleType(name))
        mod.__path__ = [root + sub]
    sys.modules["timm"].__version__ = importlib.metadata.version("timm")
    fake = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    for name in fake:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = nn.Module
    try:
        return importlib.import_module("timm.layers.evo_norm")
    finally:
        for name in fake:
            del sys.modules[name]


def layers(channels: int) -> dict[str, nn.Module]:
    timm = timm_evo_norm()
    return {
        "BatchNorm2d+ReLU": nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()),
        "timm EvoNorm2dB0": timm.EvoNorm2dB0(channels),
        "ours EvoNormB0": EvoNormB0(channels),
        "timm EvoNorm2dS0": timm.EvoNorm2dS0(channels),
        "ours EvoNormS0": EvoNormS0(channels),
    }


def allocations(fn: Callable[[], None]) -> list[int]:
    """Signed allocation sizes (bytes) in time order while `fn` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    return [size for _, size in sorted(events)]


def peak(sizes: list[int]) -> int:
    live = top = 0
    for s in sizes:
        live += s
        top = max(top, live)
    return top


def measure(mods: dict[str, nn.Module], x: torch.Tensor, repeat: int) -> dict[str, dict]:
    g = torch.randn_like(x)

    def step(m: nn.Module) -> None:
        x.grad = None
        m(x).backward(g)

    times: dict[str, list[float]] = {k: [] for k in mods}
    for m in [*mods.values()] * 2:  # warm-up
        step(m)
    for _ in range(repeat):
        for name, m in mods.items():
            t0 = time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, m in mods.items():
        kept: list[torch.Tensor] = []
        saved = sum(allocations(lambda m=m, kept=kept: kept.append(m(x))))
        saved -= kept.pop().numel() * x.element_size()
        fwd_bwd = peak(allocations(lambda m=m: step(m)))
        out[name] = {
            "time_ms": 1e3 * statistics.median(times[name]),
            "times_ms": [1e3 * t for t in times[name]],
            "peak_mb": fwd_bwd / MB,
            "saved_mb": saved / MB,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, torch.get_num_threads()],
        help="torch intra-op thread counts to measure (default: 1 and all)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: (8, 64, 28, 28), 3 rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.shape, args.repeat = [8, 64, 28, 28], 3
    torch.manual_seed(0)
    mods = layers(args.shape[1])
    load = os.getloadavg()[0]
    results = {}
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", CL)):
            x = torch.randn(args.shape).contiguous(memory_format=fmt).requires_grad_()
            key = f"{threads} thread{'s' if threads > 1 else ''}, {layout}"
            results[key] = measure(mods, x, args.repeat)
            print(key, {k: round(v["time_ms"], 1) for k, v in results[key].items()})

    command = "flock /tmp/gradlane-bench.lock .venv/bin/python " + shlex.join(
        ["benchmarks/evonorm.py", *sys.argv[1:]]
    )
    ratios = {
        f"{case}, {kind} {metric}": r[f"ours EvoNorm{kind}"][metric]
        / r[f"timm EvoNorm2d{kind}"][metric]
        for case, r in results.items()
        for kind in ("B0", "S0")
        for metric in ("time_ms", "peak_mb")
    }
    summary = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        f"; 1-min load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        "shape": args.shape,
        "repeat": args.repeat,
        "results": results,
        "ours_over_timm": ratios,
        "target_met": all(v <= 0.5 for v in ratios.values()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evonorm.json").write_text(json.dumps(summary, indent=1))
    (args.out / "evonorm.md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict) -> str:
    lines = [
        f"### EvoNorm forward + backward, input {tuple(s['shape'])} fp32, CPU",
        "",
        "| threads, layout | layer | time (ms) | vs timm | vs BN+ReLU | peak MB | vs timm "
        "| saved MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, r in s["results"].items():
        bn = r["BatchNorm2d+ReLU"]
        for name, v in r.items():
            kind = name[-2:]
            timm = r.get(f"timm EvoNorm2d{kind}") if name.startswith("ours") else None
            vs_t = f"{v['time_ms'] / timm['time_ms']:.2f}x" if timm else ""
            vs_m = f"{v['peak_mb'] / timm['peak_mb']:.2f}x" if timm else ""
            lines.append(
                f"| {case} | {name} | {v['time_ms']:.1f} | {vs_t} "
                f"| {v['time_ms'] / bn['time_ms']:.2f}x | {v['peak_mb']:.1f} | {vs_m} "
                f"| {v['saved_mb']:.1f} |"
            )
    status = "met" if s["target_met"] else "NOT met"
    worst = max(s["ours_over_timm"].items(), key=lambda kv: kv[1])
    return "\n".join(
        [
            *lines,
            "",
            f"Target (ours <= 0.5x timm in time and peak memory, B0 and S0, every case): "
            f"**{status}**; worst ratio {worst[1]:.2f} ({worst[0]}).",
            "Peak MB: allocated during forward + backward (output and input gradient "
            "included); saved MB: held after the forward beyond the output.",
            "",
            f"Command: `{s['command']}`  ",
            f"Machine: {s['machine']}; median of {s['repeat']} interleaved rounds.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
