"""Gaunt tensor product (dense, grid and FFT backends) vs e3nn's TensorProduct, same quantity.

    /work/bin/cpu-run bench .venv/bin/python benchmarks/gaunt.py            # CPU, B=64
    python benchmarks/gaunt.py --device cuda --out DIR                      # GPU, B=256
    .venv/bin/python benchmarks/gaunt.py --quick                            # smoke run

Both sides compute, per channel ("uuu"), the product of two SH feature vectors
of degree lmax projected to degree lmax on every path with l1 + l2 + l3 even:
ours is `GauntTensorProduct(lmax, lmax, lmax, C)` with per-degree weights w1, w2,
w3; e3nn's is `o3.TensorProduct` with instructions (l1, l2, l3, "uuu") whose path
weights are the Gaunt factors g(l1, l2, l3) and whose weights are w1 w2 w3. Inputs
are in each library's own layout (not timed). Time: median over interleaved
rounds of forward, and of forward + backward (gradients of both inputs), fp32,
each round timing a block of back-to-back calls of about 20 ms per case;
"max rel diff" compares outputs and input gradients to e3nn's. Extra sizes
(--backend-lmax) time the grid and FFT backends alone, to find where FFT overtakes
the grid; at every size the "fft calls only" row times the FFT backend's FFT calls
without the rest of its work, a floor for any route through its torus grid. The
CPU run also times one training step of the recipe's potential with backbone=gaunt
vs backbone=e3nn at the same width and lmax. Only torch, e3nn and
numpy are needed on the --device cuda path. Writes gaunt_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_model

from gradlane.layers import GauntTensorProduct
from gradlane.layers.gaunt import CHUNK_BYTES, DENSE_UP_TO, FFT_FROM
from gradlane.layers.sh_fourier import FourierSampler

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {4: 8.0, 8: 15.0}  # lmax -> speedup over e3nn required (CPU, fwd and fwd+bwd)


def gaunt_path_weight(l1: int, l2: int, l3: int) -> float:
    """g(l1, l2, l3) with Gaunt = g x e3nn's unit-norm wigner_3j: the invariant
    sum_m C Y_l1 Y_l2 Y_l3 (component normalisation) evaluated at one point."""
    from e3nn import o3

    point = torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64)
    ys = [
        o3.spherical_harmonics(ell, point, normalize=True, normalization="component")[0]
        for ell in (l1, l2, l3)
    ]
    return torch.einsum("ijk,i,j,k->", o3.wigner_3j(l1, l2, l3, dtype=torch.float64), *ys).item()


def e3nn_product(lmax: int, channels: int, w: list[torch.Tensor], device) -> Callable:
    """e3nn's TensorProduct with weight g(l1, l2, l3) w1 w2 w3 on each path."""
    from e3nn import o3

    irreps = o3.Irreps([(channels, (ell, (-1) ** ell)) for ell in range(lmax + 1)])
    paths = [(a, b, c) for a in range(lmax + 1) for b in range(lmax + 1)
             for c in range(abs(a - b), min(a + b, lmax) + 1) if (a + b + c) % 2 == 0]  # fmt: skip
    tp = o3.TensorProduct(
        irreps, irreps, irreps,
        [(a, b, c, "uuu", True) for a, b, c in paths],
        irrep_normalization="none", path_normalization="none",
        internal_weights=False, shared_weights=True,
    ).to(device)  # fmt: skip
    # e3nn applies an instruction's path_weight under a square root: g goes into the weights
    weight = torch.cat([gaunt_path_weight(a, b, c) * w[0][:, a] * w[1][:, b] * w[2][:, c]
                        for a, b, c in paths]).to(device)  # fmt: skip
    return lambda x1, x2: tp(x1, x2, weight)


def e3nn_layout(x: torch.Tensor, lmax: int) -> torch.Tensor:
    return torch.cat([x[..., e * e : (e + 1) ** 2].flatten(1) for e in range(lmax + 1)], 1)


BLOCK_MS = 20.0  # each timing is a block of back-to-back calls lasting about this long


def timer(device: torch.device) -> Callable[[Callable, int], float]:
    """ms per call of `fn`, timed over a block of `calls` back-to-back calls."""

    def run(fn: Callable, calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0) / calls

    return run


def measure(cases: dict[str, tuple[Callable, tuple]], repeat: int, device) -> dict[str, dict]:
    """Median ms of forward and forward+backward for each case, the cases interleaved:
    each round times every case as a block of calls lasting about BLOCK_MS (as
    `torch.utils.benchmark`'s blocked timing does), so that a fast case is not charged
    the wake-up of an idle or just-switched CPU on each call while a slow one is not."""
    clock = timer(device)
    steps = {}
    for name, (fn, inputs) in cases.items():
        if inputs is None:  # fn is already the (forward, forward+backward) pair
            steps[name] = fn
            continue
        grads = [torch.randn_like(fn(*inputs))]

        def fwd(fn=fn, inputs=inputs):
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd(fn=fn, inputs=inputs, grads=grads):
            torch.autograd.grad(fn(*inputs), inputs, grads)

        steps[name] = (fwd, fwd_bwd)
    times = {name: ([], []) for name in cases}
    calls = {}
    for _ in range(6):  # warm-up (e3nn's TorchScript kernels settle after a few calls)
        for name, (fwd, fwd_bwd) in steps.items():
            calls[name] = [max(1, round(BLOCK_MS / clock(f, 1))) for f in (fwd, fwd_bwd)]
    for _ in range(repeat):
        for name, (fwd, fwd_bwd) in steps.items():
            times[name][0].append(clock(fwd, calls[name][0]))
            times[name][1].append(clock(fwd_bwd, calls[name][1]))
    return {n: {"fwd_ms": statistics.median(f), "fwd_bwd_ms": statistics.median(b)}
            for n, (f, b) in times.items()}  # fmt: skip


def fft_calls(lmax: int, rows: int, device) -> tuple[Callable, Callable]:
    """The FFT calls alone of the FFT backend's product (lmax, lmax -> lmax) on `rows`
    rows, chunked as it chunks them: per chunk, forward 2 syntheses (a complex FFT over
    the L+1 nonzero polar columns, then a real inverse FFT) and 1 projection (a real
    2-D FFT); forward+backward 5 and 3 (the backward samples three inputs and projects
    two). Every route through this torus grid makes these calls, whatever else it does."""
    sampler = FourierSampler(3 * lmax, 2 * lmax)
    na, nb = sampler.n_alpha, sampler.n_beta
    chunk = rows if device.type != "cpu" else max(64, CHUNK_BYTES // (na * nb * 4))
    sizes = [min(chunk, rows - s) for s in range(0, rows, chunk)]
    spec = torch.randn(chunk, na, lmax + 1, dtype=torch.complex64, device=device)
    values = torch.randn(chunk, na, nb, device=device)

    def calls(inverse: int, forward: int) -> None:
        for n in sizes:
            for _ in range(inverse):
                torch.fft.irfft(torch.fft.ifft(spec[:n], dim=1), n=nb, dim=2)
            for _ in range(forward):
                torch.fft.rfft2(values[:n], dim=(1, 2))

    return lambda: calls(2, 1), lambda: calls(5, 3)


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def compare(lmax: int, batch: int, channels: int, repeat: int, device, anchor: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(lmax)
    d = (lmax + 1) ** 2
    x1 = torch.randn(batch, channels, d, generator=gen).to(device).requires_grad_()
    x2 = torch.randn(batch, channels, d, generator=gen).to(device).requires_grad_()
    ours = {}
    for backend in ("dense", "grid", "fft") if anchor else ("grid", "fft"):
        module = GauntTensorProduct(lmax, lmax, lmax, channels, backend=backend)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        ours[backend] = module.to(device)
    for module in ours.values():  # the weights e3nn's paths get
        module.load_state_dict(ours["grid"].state_dict())
    cases = {f"ours {b}": (m, (x1, x2)) for b, m in ours.items()}
    cases["fft calls only"] = (fft_calls(lmax, batch * channels, device), None)
    diffs = {}
    if anchor:
        w = [p.detach().cpu() for p in ours["grid"].parameters()]
        tp = e3nn_product(lmax, channels, w, device)
        y1 = e3nn_layout(x1.detach(), lmax).requires_grad_()
        y2 = e3nn_layout(x2.detach(), lmax).requires_grad_()
        cases["e3nn"] = (tp, (y1, y2))
        g = torch.randn(batch, channels, d, generator=gen).to(device)
        ref = tp(y1, y2)
        ref_grads = torch.autograd.grad(ref, (y1, y2), e3nn_layout(g, lmax))
        for name, module in ours.items():
            out = module(x1, x2)
            grads = torch.autograd.grad(out, (x1, x2), g)
            pairs = [(out, ref), *zip(grads, ref_grads, strict=True)]
            diffs[f"ours {name}"] = max(max_rel_diff(e3nn_layout(a, lmax), b) for a, b in pairs)
    timed = measure(cases, repeat, device)
    rows = []
    for name, t in timed.items():
        row = {"lmax": lmax, "case": name, **t}
        if anchor and name.startswith("ours"):
            row["speedup_fwd"] = timed["e3nn"]["fwd_ms"] / t["fwd_ms"]
            row["speedup_fwd_bwd"] = timed["e3nn"]["fwd_bwd_ms"] / t["fwd_bwd_ms"]
            row["max_rel_diff"] = diffs[name]
        rows.append(row)
    return rows


def model_step(lmax: int, channels: int, repeat: int) -> dict[str, float] | None:
    """ms per training step (energy, forces with create_graph, backward) of the recipe's
    potential, backbone gaunt vs e3nn, on one fixed batch of 8 EMT structures."""
    try:
        from gradlane.recipes.equivariant.data import MDSettings, collate, load, to_structures
        from gradlane.recipes.equivariant.model import build_model, energy_and_forces
    except ImportError as exc:  # the --device cuda environment need not have the recipe's deps
        print(f"model step skipped: {exc}")
        return None
    settings = MDSettings((1, 2, 3), 3.61, 0.0, 0.02, (300.0,), 600.0, 1, 20, 8, 5, 5.0, 0.02, 0)
    with tempfile.TemporaryDirectory() as tmp:
        data = to_structures(load(settings, Path(tmp))["train"], 4.5)
    batch = collate(data, list(range(8))).to(torch.device("cpu"), torch.float32)
    cases = {}
    for backbone in ("gaunt", "e3nn"):
        torch.manual_seed(0)
        sizes = dict(channels=channels, lmax=lmax, layers=2, cutoff=4.5, radial=8,
                     radial_hidden=32, readout_hidden=32, correlation=2)  # fmt: skip
        model = build_model(backbone, [29], **sizes)

        def step(model=model):
            energy, forces = energy_and_forces(model, batch, create_graph=True)
            (energy.square().mean() + forces.square().mean()).backward()

        cases[backbone] = step
    clock = timer(torch.device("cpu"))
    for fn in [*cases.values()] * 2:
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            times[name].append(clock(fn, 1))  # a step lasts ~0.2 s or more
    out = {f"{name}_ms": statistics.median(t) for name, t in times.items()}
    out["speedup"] = out["e3nn_ms"] / out["gaunt_ms"]
    return {"lmax": lmax, "channels": channels, "structures": 8, "atoms": 8 * 24,
            "edges": int(batch.src.numel()), **out}  # fmt: skip


def markdown(s: dict) -> str:
    dev = s["device"]
    lines = [
        f"### Gaunt tensor product vs e3nn TensorProduct, {dev}, B={s['batch']}, "
        f"C={s['channels']}, fp32",
        "",
        "| lmax | case | forward ms | speedup | fwd+bwd ms | speedup | max rel diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in s["rows"]:
        sp = f"{r['speedup_fwd']:.1f}x" if "speedup_fwd" in r else ""
        spb = f"{r['speedup_fwd_bwd']:.1f}x" if "speedup_fwd_bwd" in r else ""
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
        lines.append(f"| {r['lmax']} | {r['case']} | {r['fwd_ms']:.2f} | {sp} "
                     f"| {r['fwd_bwd_ms']:.2f} | {spb} | {diff} |")  # fmt: skip
    faster = s["fft_faster_from"] or "none measured"
    calls = s["fft_calls_faster_from"] or "none measured"
    lines += [
        "",
        f"FFT faster than grid (forward) from lmax: {faster}. The FFT calls alone (the "
        f"'fft calls only' rows) faster than the whole grid product (forward) from lmax: "
        f"{calls}.",
    ]
    for lmax, need in TARGETS.items():
        if dev == "cpu" and lmax in s["lmax"]:
            best = max((r for r in s["rows"] if r["lmax"] == lmax and "speedup_fwd" in r),
                       key=lambda r: min(r["speedup_fwd"], r["speedup_fwd_bwd"]))  # fmt: skip
            met = min(best["speedup_fwd"], best["speedup_fwd_bwd"]) >= need
            lines.append(
                f"Target lmax {lmax}: >= {need:g}x e3nn forward and fwd+bwd: "
                f"**{'met' if met else 'NOT met'}** ({best['case']}: "
                f"{best['speedup_fwd']:.1f}x / {best['speedup_fwd_bwd']:.1f}x)."
            )
    if s.get("model_step"):
        m = s["model_step"]
        lines += [
            "",
            f"Recipe potential, one training step (energy + forces with create_graph + "
            f"backward), {m['structures']} structures / {m['atoms']} atoms / {m['edges']} "
            f"edges, C={m['channels']}, lmax={m['lmax']}: gaunt {m['gaunt_ms']:.1f} ms, "
            f"e3nn {m['e3nn_ms']:.1f} ms ({m['speedup']:.2f}x).",
        ]
    lines += ["", f"Command: `{s['command']}`  ", f"Machine: {s['machine']}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, help="default: 64 on cpu, 256 on cuda")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--lmax", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--backend-lmax", type=int, nargs="*", default=[10, 12, 16],
                   help="extra sizes timing the two backends only (no e3nn)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-model", action="store_true", help="skip the recipe model step")
    p.add_argument("--quick", action="store_true", help="smoke run: lmax 2 4, B=8, 2 rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    if args.quick:
        args.lmax, args.backend_lmax, batch, args.repeat = [2, 4], [6], 8, 2
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = []
    for lmax in [*args.lmax, *args.backend_lmax]:
        rows += compare(lmax, batch, args.channels, args.repeat, device, lmax in args.lmax)
        print(*(f"lmax {r['lmax']} {r['case']}: {r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f} ms"
                for r in rows if r["lmax"] == lmax), sep="\n", flush=True)  # fmt: skip
    by = {(r["lmax"], r["case"]): r for r in rows}
    faster = [lm for lm in sorted({r["lmax"] for r in rows})
              if by[lm, "ours fft"]["fwd_ms"] < by[lm, "ours grid"]["fwd_ms"]]  # fmt: skip
    calls_faster = [lm for lm in sorted({r["lmax"] for r in rows}) if
                    by[lm, "fft calls only"]["fwd_ms"] < by[lm, "ours grid"]["fwd_ms"]]  # fmt: skip
    step = None
    if device.type == "cpu" and not args.no_model:
        step = model_step(2, 32, args.repeat)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_model()}, {os.cpu_count()} CPUs, {args.threads} torch threads")  # fmt: skip
    import e3nn

    summary = {
        "device": device.type,
        "batch": batch,
        "channels": args.channels,
        "lmax": args.lmax,
        "rows": rows,
        "fft_faster_from": faster[0] if faster else None,
        "fft_calls_faster_from": calls_faster[0] if calls_faster else None,
        "auto_rule_dense_up_to_total_degree": DENSE_UP_TO.get(device.type),
        "auto_rule_fft_from_total_degree": FFT_FROM.get(device.type),
        "model_step": step,
        "command": shlex.join(["python", "benchmarks/gaunt.py", *sys.argv[1:]]),
        "machine": f"{name}; torch {torch.__version__}, e3nn {e3nn.__version__}, "
        f"python {platform.python_version()}; 1-min load {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; median of {args.repeat} interleaved rounds, "
        f"each a ~{BLOCK_MS:.0f} ms block of calls per case",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gaunt_{device.type}.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.out / f"gaunt_{device.type}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
