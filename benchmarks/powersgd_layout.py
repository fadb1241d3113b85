"""PowerSGD's products in two layouts, on the lm GPT's batched layer shapes.

    python benchmarks/powersgd_layout.py [--threads 1] [--out benchmarks/results]

Per step PowerSGD computes P = M Q and Q_w = M^T P for a batch of b same-shape
layers M (n x m) at rank r. Computed transposed, P^T = Q^T M^T and Q_w^T = P^T M,
the products are the same numbers with r rows instead of r columns, which BLAS
libraries block differently. Times both forms (median of `--repeats` rounds, each
the mean of `--calls` calls) and writes powersgd_layout.json / .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model

SHAPES = [(6, 768, 256), (6, 1024, 256), (6, 256, 1024), (6, 256, 256)]  # GPT d=256, 6 blocks
RANKS = [4, 8, 16, 23, 32]


def timed(fn, calls: int, repeats: int) -> float:
    """Median over rounds of the mean microseconds per call."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def measure(b: int, n: int, m: int, r: int, calls: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    mat = torch.randn(b, n, m, generator=gen)
    q, p = torch.randn(b, m, r, generator=gen), torch.randn(b, n, r, generator=gen)
    qt, pt = q.transpose(1, 2).contiguous(), p.transpose(1, 2).contiguous()
    assert torch.allclose(mat @ q, (qt @ mat.transpose(1, 2)).transpose(1, 2), rtol=1e-4, atol=1e-3)
    row = {"b": b, "n": n, "m": m, "rank": r}
    row["mq_us"] = timed(lambda: torch.bmm(mat, q), calls, repeats)
    row["qt_mt_us"] = timed(lambda: torch.bmm(qt, mat.transpose(1, 2)), calls, repeats)
    row["mt_p_us"] = timed(lambda: torch.bmm(mat.transpose(1, 2), p), calls, repeats)
    row["pt_m_us"] = timed(lambda: torch.bmm(pt, mat), calls, repeats)
    row["speedup"] = (row["mq_us"] + row["mt_p_us"]) / (row["qt_mt_us"] + row["pt_m_us"])
    return row


def markdown(report: dict) -> str:
    lines = [
        "# PowerSGD products: r x n (transposed, ours) vs n x r layout",
        "",
        f"`{report['command']}`",
        "",
        f"{report['machine']}; microseconds per batched product, median of rounds.",
        "",
        "| b x n x m | rank | M Q | Q^T M^T | M^T P | P^T M | both, old / new |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['b']} x {r['n']} x {r['m']} | {r['rank']} | {r['mq_us']:.0f} | "
            f"{r['qt_mt_us']:.0f} | {r['mt_p_us']:.0f} | {r['pt_m_us']:.0f} | "
            f"{r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one DDP rank)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.calls < 1 or args.repeats < 1:
        parser.error("--threads, --calls and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    rows = [measure(*shape, r, args.calls, args.repeats) for shape in SHAPES for r in RANKS]
    report = {
        "command": "python benchmarks/powersgd_layout.py"
        + ("" if args.threads == 1 else f" --threads {args.threads}"),
        "machine": f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "powersgd_layout.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "powersgd_layout.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
