"""Comm hooks side by side on the lm recipe's GPT at 2 DDP ranks (gloo, 127.0.0.1).

    flock /tmp/gradlane-bench.lock .venv/bin/python benchmarks/comm.py   # full run
    .venv/bin/python benchmarks/comm.py --quick                          # smoke run

Every configuration trains the same model from the same seed on the same data:
compute only (each rank alone, no synchronisation), plain DDP, torch's PowerSGD
and fp16 hooks (the anchors), our uniform PowerSGD / TopK / QSGD / fp16 and our
L-GreCo variants. On plain loopback each runs `--steps` steps and reports the
per-step time, the bytes per step, the compression error and the validation
loss; then, as root, each runs `--timed-steps` steps inside a private network
namespace whose loopback is rate-limited by `tc tbf` (1 Gbit/s, 100 Mbit/s) for
the per-step time there (both ranks share that one link). Step times are means
over the steps after the `--start-iter` warm-up (plain all-reduce) steps.
Writes `comm.json` and `comm.md` (the table, the targets and this command).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

RESULTS = Path(__file__).resolve().parent / "results"
LINKS = {"1gbit": "1gbit", "100mbit": "100mbit"}  # name -> tc tbf rate


ONE_BUCKET_MB = 1024.0  # a bucket cap larger than the model: DDP makes one bucket


def configs(args: argparse.Namespace) -> dict[str, dict]:
    """Label -> {"comm": hook config or None (compute only, no DDP), optional
    "bucket_cap_mb", "loopback_only", "engine" (deepspeed | horovod: the same compressor
    through gradlane's DeepSpeed or Horovod engine instead of a DDP comm hook)}."""
    start, rank = args.start_iter, args.rank
    lgreco = {
        "hook": "lgreco",
        "start_iter": start,
        "adjust_every": args.adjust_every,
        "accumulate": args.accumulate,
        "alpha": args.alpha,
    }
    ours_psgd = {"hook": "powersgd", "rank": rank, "start_iter": start}
    torch_psgd = {"hook": "torch_powersgd", "rank": rank, "start_iter": start}
    one_bucket = {"bucket_cap_mb": ONE_BUCKET_MB, "loopback_only": True}
    return {
        "compute only": {"comm": None},
        "plain DDP": {"comm": {"hook": "none"}},
        f"torch PowerSGD r{rank}": {"comm": torch_psgd},
        f"torch PowerSGD r{rank} (one bucket)": {"comm": torch_psgd} | one_bucket,
        "torch fp16": {"comm": {"hook": "torch_fp16"}},
        f"PowerSGD r{rank}": {"comm": ours_psgd},
        f"PowerSGD r{rank} (one bucket)": {"comm": ours_psgd} | one_bucket,
        f"TopK {args.density:g}": {
            "comm": {"hook": "topk", "density": args.density, "start_iter": start}
        },
        f"QSGD {args.bits} bit": {"comm": {"hook": "qsgd", "bits": args.bits, "start_iter": start}},
        "fp16": {"comm": {"hook": "fp16"}},
        f"L-GreCo PowerSGD (r{rank})": {"comm": lgreco | {"compressor": "powersgd", "rank": rank}},
        f"L-GreCo TopK ({args.density:g})": {
            "comm": lgreco | {"compressor": "topk", "density": args.density}
        },
        f"L-GreCo QSGD ({args.bits} bit)": {
            "comm": lgreco | {"compressor": "qsgd", "bits": args.bits}
        },
        **{
            f"{name} {label}": {"comm": comm, "engine": engine}
            for engine, name in (("deepspeed", "DeepSpeed"), ("horovod", "Horovod"))
            for label, comm in (
                (f"PowerSGD r{rank}", ours_psgd),
                (f"L-GreCo PowerSGD (r{rank})", lgreco | {"compressor": "powersgd", "rank": rank}),
            )
        },
    }


# ---------------------------------------------------------------- one run, in each rank


def _rank(rank: int, spec: dict, outdir: str) -> None:
    torch.set_num_threads(spec["threads"])
    # what torchrun would set: DeepSpeed reads them, Horovod's rendezvous runs at MASTER_ADDR
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    cfg = spec["comm"]
    if cfg is not None:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{spec['port']}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=spec["timeout_s"]),
        )
    try:
        result = _train(rank, spec, cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        Path(outdir, "result.json").write_text(json.dumps(result))


def _train(rank: int, spec: dict, cfg: dict | None) -> dict:
    import gradlane
    from gradlane.comm import dense_bytes
    from gradlane.compressors import PowerSGD
    from gradlane.recipes.lm.data import eval_batches, load_corpus, random_batch
    from gradlane.recipes.lm.model import GPT

    torch.manual_seed(0)
    model = GPT(**spec["model"])
    corpus = load_corpus(spec["max_bytes"])
    gen = torch.Generator().manual_seed(1000 + rank)
    net, hook = model, None
    if spec["engine"] != "ddp":
        hook, train_step = _engine(spec, model, cfg)
    else:
        if cfg is not None:
            net = DDP(model, bucket_cap_mb=spec["bucket_cap_mb"])
            hook = gradlane.register_comm_hook(net, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
        warm = spec["warmup"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))

        def train_step(batch: torch.Tensor) -> torch.Tensor:
            loss = _next_byte_loss(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return loss

    length = spec["model"]["context"] + 1
    times, sent, errors = [], [], []
    for step in range(spec["steps"]):
        batch = random_batch(corpus.train, spec["batch"], length, gen)
        t0 = time.perf_counter()
        loss = train_step(batch)
        elapsed = time.perf_counter() - t0
        if step >= spec["start_iter"]:
            times.append(elapsed)
            metrics = hook.metrics() if hook is not None else {}
            if "comm/bytes_per_step" in metrics:
                sent.append(metrics["comm/bytes_per_step"])
            if "comm/relative_error" in metrics:
                errors.append(metrics["comm/relative_error"])

    result = {"step_times_s": times}
    if cfg is None:
        return result
    if not sent:  # torch's hooks report nothing: their payload, computed
        shapes = [p.shape for p in model.parameters()]
        if cfg["hook"] == "torch_fp16":
            sent = [dense_bytes(model) / 2]
        elif cfg["hook"] == "torch_powersgd":
            psgd = PowerSGD(cfg["rank"])
            sent = [sum(psgd.wire_bytes(s, cfg["rank"]) for s in shapes)]
        result["bytes_computed"] = True
    model.eval()
    with torch.no_grad():
        val = [
            float(model.loss(b))
            for b in eval_batches(corpus.val, spec["batch"], length, spec["eval_batches"])
        ]
    result |= {
        "bytes_per_step": sum(sent) / len(sent),
        "dense_bytes_per_step": dense_bytes(model),
        "val_loss": sum(val) / len(val),
        "final_train_loss": float(loss.detach()),
    }
    if errors:
        result["relative_error"] = sum(errors) / len(errors)
    state = hook.exchange if spec["engine"] != "ddp" else hook.state
    if getattr(state, "controller", None) is not None:
        result["lgreco"] = {
            "decisions": state.controller.decisions,
            "predicted": state.controller.last,
            "levels": {n: state.levels[n] for n in state.compressed_layers()},
        }
    result["compute_step_time_s"] = _compute_only(model, corpus, spec, gen)
    return result


def _next_byte_loss(net, batch: torch.Tensor) -> torch.Tensor:
    logits = net(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _engine(spec: dict, model, comm: dict):
    """gradlane's DeepSpeed or Horovod engine (as `trainer.engine` builds it) with the
    same optimizer and warm-up as the DDP rows; returns it and a one-batch step."""
    from omegaconf import OmegaConf

    from gradlane.engines import build_engine
    from gradlane.recipe import Task

    cfg = OmegaConf.create(
        {
            "trainer": {"engine": spec["engine"]},
            "run": {"steps": spec["steps"]},
            "data": {"batch_size": spec["batch"]},
            "comm": comm,
            "optimizer": {"name": "adamw", "lr": spec["lr"], "weight_decay": 0.0,
                          "schedule": "constant", "warmup_steps": spec["warmup"]},
            "deepspeed": {"zero_stage": 0, "gradient_accumulation_steps": 1,
                          "precision": "fp32", "gradient_clipping": 0.0},
        }
    )  # fmt: skip
    engine = build_engine(cfg, model, torch.device("cpu"))

    class OneBatch(Task):
        def batch(self, step: int) -> torch.Tensor:
            return self.current

        def loss(self, net, batch: torch.Tensor) -> torch.Tensor:
            return _next_byte_loss(net, batch)

    task = OneBatch()

    def train_step(batch: torch.Tensor) -> torch.Tensor:
        task.current = batch
        return engine.train_step(task, 0)[0]

    return engine, train_step


def _compute_only(model, corpus, spec: dict, gen: torch.Generator) -> float:
    """Mean step time of a local copy trained without synchronisation, in this same run
    (both ranks at once, so under the same load as the synchronised steps)."""
    from gradlane.recipes.lm.data import random_batch

    local = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(local.parameters(), lr=spec["lr"], weight_decay=0.0)
    times = []
    for _ in range(spec["compute_steps"] + 1):
        batch = random_batch(corpus.train, spec["batch"], spec["model"]["context"] + 1, gen)
        t0 = time.perf_counter()
        loss = local.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / spec["compute_steps"]  # the first step allocates


# ---------------------------------------------------------------- driver


def run_one(label: str, entry: dict, args: argparse.Namespace, steps: int) -> dict:
    cfg = entry["comm"]
    spec = {
        "comm": cfg,
        "steps": steps,
        "start_iter": args.start_iter,
        "model": {
            "n_layer": args.n_layer,
            "n_head": args.n_head,
            "d_model": args.d_model,
            "context": args.context,
        },
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "max_bytes": args.max_bytes,
        "eval_batches": args.eval_batches,
        "compute_steps": args.compute_steps,
        "bucket_cap_mb": entry.get("bucket_cap_mb", args.bucket_cap_mb),
        "engine": entry.get("engine", "ddp"),
        "threads": args.threads,
        "port": _free_port(),
        "timeout_s": args.timeout_s,
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_rank, args=(spec, tmp), nprocs=2, join=True)
            result = json.loads(Path(tmp, "result.json").read_text())
        except Exception as exc:  # a hook that crashes is a result too
            result = {"failed": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"}
    times = result.get("step_times_s", [])
    if times:
        result["step_time_s"] = sum(times) / len(times)
        result["step_time_median_s"] = sorted(times)[len(times) // 2]
    result |= {"config": label, "steps": steps, "wall_s": time.time() - t0}
    result |= {"comm": cfg, "bucket_cap_mb": spec["bucket_cap_mb"]}
    brief = {k: result[k] for k in ("step_time_s", "bytes_per_step", "val_loss") if k in result}
    print(f"  {label:28s} {json.dumps(brief)} {result.get('failed', '')}", flush=True)
    return result


def _in_netns(link: str, args: argparse.Namespace) -> list[dict]:
    ns = f"gl_bw_{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "runs.json")
        _sh("ip", "netns", "add", ns)
        try:
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                "rate", LINKS[link], "burst", "512kb", "latency", "20ms")  # fmt: skip
            cmd = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve())]
            cmd += [*sys.argv[1:], "--child-link", link, "--child-out", str(out)]
            subprocess.run(cmd, check=True)
        finally:
            _sh("ip", "netns", "del", ns)
        return json.loads(out.read_text())


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def netns_available() -> str | None:
    """None when rate-limited links can be measured here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


# ---------------------------------------------------------------- report


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with the measured numbers and met / missed."""
    out, runs, rank = [], report["runs"], report["meta"]["rank"]
    loop = runs.get("loopback", {})
    uni, lg = loop.get(f"PowerSGD r{rank}", {}), loop.get(f"L-GreCo PowerSGD (r{rank})", {})
    if "bytes_per_step" in uni and "lgreco" in lg:
        ratio = uni["bytes_per_step"] / lg["bytes_per_step"]
        predicted = lg["lgreco"]["predicted"]
        out.append(
            {
                "target": f"L-GreCo PowerSGD sends >= 1.5x fewer bytes than uniform PowerSGD "
                f"r{rank}, total compression error no higher",
                "measured": f"{ratio:.2f}x fewer bytes over the run; total error (the "
                f"knapsack's measure, both on the same gradients) {predicted['error_ratio']:.3f}x "
                f"the uniform's at the last decision, which predicted "
                f"{predicted['bytes_ratio']:.2f}x fewer bytes; error feedback residual over the "
                f"run (different trajectories) {lg['relative_error']:.3f} vs "
                f"{uni['relative_error']:.3f} of ||g + e||^2",
                "met": bool(ratio >= 1.5 and predicted["error_ratio"] <= 1.0 + 1e-9),
            }
        )
    slow = runs.get("100mbit", {})
    plain = slow.get("plain DDP", {})
    lg_slow = slow.get(f"L-GreCo PowerSGD (r{rank})", {})
    alone = slow.get("compute only", {})
    if all("step_time_s" in r for r in (plain, lg_slow, alone)) and "val_loss" in lg:
        speedup = plain["step_time_s"] / lg_slow["step_time_s"]
        overhead = lg_slow["step_time_s"] / lg_slow["compute_step_time_s"]
        loss_gap = lg["val_loss"] / loop["plain DDP"]["val_loss"] - 1
        out.append(
            {
                "target": "at 100 Mbit/s L-GreCo PowerSGD steps >= 4x faster than plain DDP, "
                "<= 1.15x compute only (same run, unsynchronised), validation loss within 2% "
                "of plain DDP (loopback run)",
                "measured": f"{speedup:.2f}x faster; {overhead:.2f}x compute only "
                f"({lg_slow['step_time_s'] / alone['step_time_s']:.2f}x the compute-only run); "
                f"validation loss {100 * loss_gap:+.2f}%",
                "met": bool(speedup >= 4 and overhead <= 1.15 and abs(loss_gap) <= 0.02),
            }
        )
    for suffix in ("", " (one bucket)"):
        ours = loop.get(f"PowerSGD r{rank}{suffix}", {})
        theirs = loop.get(f"torch PowerSGD r{rank}{suffix}", {})
        target = (
            f"on loopback our PowerSGD r{rank} costs <= 1.2x the step time of torch's "
            f"PowerSGD hook (bucket_cap_mb={ours.get('bucket_cap_mb')})"
        )
        if "step_time_s" in ours and "failed" in theirs:
            measured = f"torch's hook crashed ({theirs['failed']}); ours ran"
            out.append({"target": target, "measured": measured, "met": None})
        elif "step_time_s" in ours and "step_time_s" in theirs:
            ratio = ours["step_time_s"] / theirs["step_time_s"]
            out.append({"target": target, "measured": f"{ratio:.2f}x", "met": bool(ratio <= 1.2)})
    return out


def markdown(report: dict) -> str:
    links = [link for link in ("loopback", "1gbit", "100mbit") if link in report["runs"]]
    head = ["configuration", "bytes/step", "ratio", "rel. error", "val loss"]
    head += [f"step s ({link})" for link in links]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    loop = report["runs"].get("loopback", {})
    for label in report["configs"]:
        r = loop.get(label, {})
        dense = r.get("dense_bytes_per_step")
        row = [label]
        if "bytes_per_step" in r:
            mark = "*" if r.get("bytes_computed") else ""
            row += [
                f"{r['bytes_per_step'] / 1e3:,.1f} kB{mark}",
                f"{dense / r['bytes_per_step']:.1f}x",
            ]
        else:
            row += ["-", "-"]
        row.append(f"{r['relative_error']:.3f}" if "relative_error" in r else "-")
        row.append(f"{r['val_loss']:.4f}" if "val_loss" in r else "-")
        for link in links:
            x = report["runs"][link].get(label, {})
            row.append(_time_cell(x))
        lines.append("| " + " | ".join(row) + " |")
    meta = report["meta"]
    text = [
        "# Comm hooks: side by side",
        "",
        f"`{meta['command']}`",
        "",
        "(run as root, under `flock /tmp/gradlane-bench.lock`; the script creates and removes "
        "the rate-limited network namespaces itself)",
        "",
        f"{meta['model']} at 2 DDP ranks (gloo, 127.0.0.1), batch {meta['batch']} x "
        f"{meta['context']} bytes per rank, {meta['threads']} thread(s) per rank, "
        f"bucket_cap_mb={meta['bucket_cap_mb']}, AdamW lr {meta['lr']}; {meta['machine']}. "
        f"Loopback: {meta['steps']} steps (validation loss after them); rate-limited links: "
        f"{meta['timed_steps']} steps. Step time: mean over the steps after the "
        f"{meta['start_iter']} warm-up steps; in brackets, its ratio to the mean time of "
        f"{meta['compute_steps']} unsynchronised steps timed right after, in the same run. "
        "Bytes: what one rank hands to the collectives per step after warm-up (measured by "
        "the hook; * computed for torch's hooks). Rel. error: "
        "mean over steps of sum ||e'||^2 / sum ||g + e||^2 (error feedback residual).",
        "",
        *lines,
        "",
    ]
    crashed = [
        f"- crashed: {label} on {link}: {r['failed']}"
        for link, runs in report["runs"].items()
        for label, r in runs.items()
        if "failed" in r
    ]
    text += [*crashed, ""] if crashed else []
    if report.get("skipped"):
        text += [f"Rate-limited links skipped: {report['skipped']}.", ""]
    text += ["## Targets", ""]
    for t in report["targets"]:
        status = {True: "met", False: "missed", None: "not comparable"}[t["met"]]
        text.append(f"- **{status}**: {t['target']}: {t['measured']}")
    lg = report["runs"].get("loopback", {}).get(f"L-GreCo PowerSGD (r{meta['rank']})", {})
    if "lgreco" in lg:
        levels = lg["lgreco"]["levels"]
        text += ["", "L-GreCo PowerSGD ranks at the end of the loopback run:", ""]
        text.append(", ".join(f"`{n}` {v}" for n, v in levels.items()))
    return "\n".join(text) + "\n"


def _time_cell(run: dict) -> str:
    """'0.634 (1.13x)': mean step time and its ratio to the same run's unsynchronised steps."""
    if "step_time_s" not in run:
        return "crashed" if "failed" in run else "-"
    if "compute_step_time_s" not in run:
        return f"{run['step_time_s']:.3f}"
    return f"{run['step_time_s']:.3f} ({run['step_time_s'] / run['compute_step_time_s']:.2f}x)"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    p.add_argument("--steps", type=int, default=100, help="steps per configuration on loopback")
    p.add_argument("--timed-steps", type=int, default=20, help="steps on rate-limited links")
    p.add_argument("--links", default="loopback,1gbit,100mbit")
    p.add_argument("--only", default="", help="comma-separated configuration labels to run")
    p.add_argument("--start-iter", type=int, default=5, help="plain all-reduce warm-up steps")
    p.add_argument(
        "--rank", type=int, default=16, help="PowerSGD rank (uniform and L-GreCo default)"
    )
    p.add_argument("--density", type=float, default=0.01, help="TopK density")
    p.add_argument("--bits", type=int, default=4, help="QSGD bits")
    p.add_argument("--alpha", type=float, default=1.0, help="L-GreCo error budget factor")
    p.add_argument("--adjust-every", type=int, default=50)
    p.add_argument("--accumulate", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20, help="learning-rate warm-up steps")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="training text")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument(
        "--compute-steps", type=int, default=8, help="unsynchronised steps timed after each run"
    )
    p.add_argument("--bucket-cap-mb", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    p.add_argument("--render", type=Path, help="only rewrite the table from this comm.json")
    p.add_argument("--child-link", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.timed_steps, args.start_iter = 12, 8, 3
        args.adjust_every, args.accumulate, args.warmup = 4, 2, 4
        args.n_layer, args.d_model, args.n_head, args.context = 2, 64, 4, 32
        args.batch, args.max_bytes, args.eval_batches = 8, 300_000, 2
    if args.out is None:  # a smoke run never overwrites the real results
        args.out = Path(tempfile.gettempdir(), "gradlane-comm-quick") if args.quick else RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.render:  # tables and targets again from a finished run's JSON
        write(json.loads(args.render.read_text()), args.out)
        return
    labels = configs(args)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        labels = {k: v for k, v in labels.items() if k in keep}
    if args.child_link:  # inside the namespace: run, hand the results back, done
        print(f"[{args.child_link}] {args.timed_steps} steps per configuration", flush=True)
        runs = [
            run_one(label, entry, args, args.timed_steps)
            for label, entry in labels.items()
            if not entry.get("loopback_only")
        ]
        Path(args.child_out).write_text(json.dumps(runs))
        return

    report = {"configs": list(labels), "runs": {}, "skipped": ""}
    links = [s.strip() for s in args.links.split(",") if s.strip()]
    why = netns_available()
    for link in links:
        if link != "loopback" and why:
            report["skipped"] = f"{', '.join(lk for lk in links if lk != 'loopback')} ({why})"
            print(f"[{link}] skipped: {why}", flush=True)
            continue
        if link == "loopback":
            print(f"[loopback] {args.steps} steps per configuration", flush=True)
            runs = [run_one(label, entry, args, args.steps) for label, entry in labels.items()]
        else:
            runs = _in_netns(link, args)
        report["runs"][link] = {r["config"]: r for r in runs}

    from gradlane.recipes.lm.model import GPT

    n_params = sum(
        p.numel() for p in GPT(args.n_layer, args.n_head, args.d_model, args.context).parameters()
    )
    report["meta"] = {
        "command": "python " + shlex.join(["benchmarks/comm.py", *(argv or sys.argv[1:])]),
        "model": f"GPT n_layer={args.n_layer} d_model={args.d_model} n_head={args.n_head} "
        f"({n_params / 1e6:.2f}M parameters)",
        "context": args.context,
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": args.timed_steps,
        "start_iter": args.start_iter,
        "rank": args.rank,
        "lr": args.lr,
        "threads": args.threads,
        "compute_steps": args.compute_steps,
        "bucket_cap_mb": args.bucket_cap_mb,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    """Targets, comm.json and comm.md (the table) under `out`."""
    report["targets"] = targets(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm.json").write_text(json.dumps(report, indent=1))
    (out / "comm.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
