"""EvoNorm forward+backward time and memory: ours vs timm's vs BatchNorm2d+ReLU (CPU or GPU).

    /work/bin/cpu-run bench .venv/bin/python benchmarks/evonorm.py   # full CPU run
    .venv/bin/python benchmarks/evonorm.py --quick                  # smoke run
    python benchmarks/evonorm.py --device cuda --out DIR            # GPU mode

For an input of `--shape` (default 32x64x56x56, fp32), contiguous and
channels-last, with 1 and with all torch threads, each layer runs forward +
backward with a preallocated gradient.
Time: the median over `--repeat` rounds, the layers taking turns within each
round so that load on a shared machine hits them alike. Memory, from the torch
profiler's allocation events: the peak of bytes allocated during forward +
backward (the output and the input's gradient included), and the bytes still
held after the forward beyond the output (what autograd saved for backward). Target: ours at
most 0.5x timm's time and peak memory. Writes `evonorm.json` and `evonorm.md`.

GPU mode (`--device cuda`): fp32 and bf16, both layouts, every implementation of ours
(`impl="eager"` and `impl="compiled"`) beside timm, `torch.compile(timm)` and
BatchNorm2d+ReLU; time per forward+backward from CUDA-synchronised loops, peak memory
from `torch.cuda.max_memory_allocated` above what was allocated before. Target: ours at
most the compiled timm's time and memory. Imports only torch and timm's evo_norm module.
Writes `evonorm_gpu.json` and `evonorm_gpu.md`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_model
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from gradlane.layers import IMPLS, EvoNormB0, EvoNormS0

RESULTS = Path(__file__).resolve().parent / "results"
CL = torch.channels_last
MB = 2**20


@functools.cache
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


def gpu_layers(channels: int, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    timm = timm_evo_norm()
    mods = {"BatchNorm2d+ReLU": nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())}
    for kind, ours, theirs in (
        ("B0", EvoNormB0, timm.EvoNorm2dB0),
        ("S0", EvoNormS0, timm.EvoNorm2dS0),
    ):
        mods[f"timm {kind}"] = theirs(channels)
        mods[f"compiled timm {kind}"] = torch.compile(theirs(channels))
        for impl in IMPLS:
            mods[f"ours {kind} {impl}"] = ours(channels, impl=impl)
    return {k: m.to(device=device, dtype=dtype) for k, m in mods.items()}


def gpu_measure(mods: dict[str, nn.Module], x: torch.Tensor, repeat: int, reps: int) -> dict:
    """Median ms per forward+backward and peak MB above the baseline, on the GPU."""
    g = torch.randn_like(x)

    def step(m: nn.Module) -> None:
        x.grad = None
        m(x).backward(g)

    for m in mods.values():  # warm-up (and compilation)
        for _ in range(3):
            step(m)
    times: dict[str, list[float]] = {k: [] for k in mods}
    for _ in range(repeat):
        for name, m in mods.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                step(m)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / reps)
    out = {}
    for name, m in mods.items():
        x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(m)
        torch.cuda.synchronize()
        out[name] = {
            "time_ms": 1e3 * statistics.median(times[name]),
            "peak_mb": (torch.cuda.max_memory_allocated() - base) / MB,
        }
    return out


def gpu_main(args) -> None:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    results = {}
    began = time.perf_counter()
    for dtype_name in args.dtypes:
        mods = gpu_layers(args.shape[1], args.device, dtypes[dtype_name])
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", CL)):
            x = torch.randn(args.shape, device=args.device, dtype=dtypes[dtype_name])
            x = x.contiguous(memory_format=fmt).requires_grad_()
            key = f"{dtype_name}, {layout}"
            results[key] = gpu_measure(mods, x, args.repeat, reps=20)
            took = time.perf_counter() - began
            print(
                key, f"({took:.0f} s)", {k: round(v["time_ms"], 3) for k, v in results[key].items()}
            )
    ratios = {
        f"{case}, {kind} {impl} {metric}": r[f"ours {kind} {impl}"][metric]
        / r[f"compiled timm {kind}"][metric]
        for case, r in results.items()
        for kind in ("B0", "S0")
        for impl in IMPLS
        for metric in ("time_ms", "peak_mb")
    }
    summary = {
        "command": "python " + shlex.join(["benchmarks/evonorm.py", *sys.argv[1:]]),
        "machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
        "shape": args.shape,
        "repeat": args.repeat,
        "seconds": time.perf_counter() - began,
        "results": results,
        "ours_over_compiled_timm": ratios,
        "met_by_impl": {
            impl: all(v <= 1.0 for k, v in ratios.items() if f" {impl} " in k) for impl in IMPLS
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evonorm_gpu.json").write_text(json.dumps(summary, indent=1))
    (args.out / "evonorm_gpu.md").write_text(gpu_markdown(summary))
    print(gpu_markdown(summary))


def gpu_markdown(s: dict) -> str:
    lines = [
        f"### EvoNorm forward + backward on the GPU, input {tuple(s['shape'])}",
        "",
        "| dtype, layout | layer | time (ms) | vs compiled timm | vs BN+ReLU | peak MB "
        "| vs compiled timm |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, r in s["results"].items():
        bn = r["BatchNorm2d+ReLU"]
        for name, v in r.items():
            ref = r.get(f"compiled timm {name.split()[1]}") if name.startswith("ours") else None
            vs_t = f"{v['time_ms'] / ref['time_ms']:.2f}x" if ref else ""
            vs_m = f"{v['peak_mb'] / ref['peak_mb']:.2f}x" if ref else ""
            lines.append(
                f"| {case} | {name} | {v['time_ms']:.3f} | {vs_t} | "
                f"{v['time_ms'] / bn['time_ms']:.2f}x | {v['peak_mb']:.1f} | {vs_m} |"
            )
    met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in s["met_by_impl"].items())
    return "\n".join(
        [
            *lines,
            "",
            f"Target (ours <= compiled timm in time and peak memory, every case), by impl: {met}.",
            "",
            f"Command: `{s['command']}`  ",
            f"Device: {s['machine']}; median of {s['repeat']} interleaved rounds of 20; "
            f"wall time {s['seconds']:.0f} s (compilation included).",
            "",
        ]
    )


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
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], help="GPU mode: dtypes to measure"
    )
    args = p.parse_args()
    if args.quick:
        args.shape, args.repeat = [8, 64, 28, 28], 3
    if args.device != "cpu":
        return gpu_main(args)
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

    command = ".venv/bin/python " + shlex.join(["benchmarks/evonorm.py", *sys.argv[1:]])
    ratios = {
        f"{case}, {kind} {metric}": r[f"ours EvoNorm{kind}"][metric]
        / r[f"timm EvoNorm2d{kind}"][metric]
        for case, r in results.items()
        for kind in ("B0", "S0")
        for metric in ("time_ms", "peak_mb")
    }
    summary = {
        "command": command,
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
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
