"""Comm hooks side by side on the lm recipe's GPT at W DDP ranks (gloo, 127.0.0.1).

    /work/bin/cpu-run bench .venv/bin/python benchmarks/comm.py         # full run, as root
    .venv/bin/python benchmarks/comm.py --quick                         # smoke run
    python benchmarks/comm.py --worlds 2,4 --links loopback --tag scaling ...  # bytes vs W

(The GPU measurement, world size 1 over NCCL, is `benchmarks/comm_gpu.py`.)

Every configuration trains the same model from the same seed on the same data:
compute only (each rank alone, no synchronisation), plain DDP, torch's PowerSGD
and fp16 hooks (the anchors), our uniform PowerSGD / TopK / QSGD / fp16 and our
L-GreCo variants. Each link runs every configuration for its steps: `loopback`
(`--steps`, then the validation loss) and rate-limited links (`--link-steps`, of
which the last `--timed-steps` are timed: after L-GreCo's decisions when the run is
longer than `--start-iter` + `--adjust-every`).
As root every link is the loopback of a private network namespace, `tc tbf`
rate-limited except `loopback`, so its byte counter holds our ranks' traffic
alone: the bytes each rank really sent per step (TCP/IP headers included) are
measured there beside the ring model's figure (`collective.py`). Step times are
means over the timed steps (loopback: all after the `--start-iter` warm-up steps), next to the mean
time of unsynchronised steps in the same run. Errors: measured, the residual
error feedback carries over the gradient's energy, sum_t ||e'||^2 / sum_t ||g||^2
over the steps after warm-up; predicted, the L-GreCo error model's figure at the
last decision (uniform hooks get a one-candidate controller for it).
Writes comm<tag>.json and comm<tag>.md (tables, targets, the command).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
from machine import cpu_model
from torch.nn.parallel import DistributedDataParallel as DDP

RESULTS = Path(__file__).resolve().parent / "results"
RATES = {"loopback": None, "1gbit": "1gbit", "100mbit": "100mbit"}  # link -> tc tbf rate
TX_BYTES = Path("/sys/class/net/lo/statistics/tx_bytes")
DEFAULT_ADJUST_EVERY = 100  # LGrecoState's default: the decision cost amortised at it
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
    uniform = {"start_iter": start, "predict_every": args.adjust_every}
    ours_psgd = {"hook": "powersgd", "rank": rank} | uniform
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
        f"TopK {args.density:g}": {"comm": {"hook": "topk", "density": args.density} | uniform},
        f"QSGD {args.bits} bit": {"comm": {"hook": "qsgd", "bits": args.bits} | uniform},
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
    os.environ.update(
        MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec["world"])
    )
    cfg = spec["comm"]
    if cfg is not None:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{spec['port']}",
            rank=rank,
            world_size=spec["world"],
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
    from gradlane.recipes.lm.data import eval_batches, load_corpus, random_batch
    from gradlane.recipes.lm.model import GPT

    torch.manual_seed(0)
    model = GPT(**spec["model"])
    corpus = load_corpus(spec["max_bytes"])
    gen = torch.Generator().manual_seed(1000 + rank)
    net, hook, state = model, None, None
    if spec["engine"] != "ddp":
        hook, train_step = _engine(spec, model, cfg)
        state = hook.exchange
    else:
        if cfg is not None:
            # as the trainer builds it (trainer.gradient_as_bucket_view, default true)
            net = DDP(model, bucket_cap_mb=spec["bucket_cap_mb"], gradient_as_bucket_view=True)
            hook = gradlane.register_comm_hook(net, cfg)
            state = hook.state
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
    times, phases, records = [], [], []
    controller = getattr(state, "controller", None)
    tx_start = None
    for step in range(spec["steps"]):
        if step == spec["start_iter"] and cfg is not None and spec["own_loopback"]:
            dist.barrier()
            tx_start = _tx_bytes()
        batch = random_batch(corpus.train, spec["batch"], length, gen)
        t0 = time.perf_counter()
        loss = train_step(batch)
        elapsed = time.perf_counter() - t0
        if step >= spec["time_from"]:
            times.append(elapsed)
            phases.append(_phase(controller, step))
        if step >= spec["start_iter"]:
            records.append(hook.metrics() if hook is not None else {})

    result = {"step_times_s": times, "step_phases": phases}
    if cfg is None:
        return result
    timed = len(records)
    if tx_start is not None and timed:  # inside our namespace: its loopback is ours alone
        dist.barrier()
        result["measured_sent_per_rank"] = (_tx_bytes() - tx_start) / spec["world"] / timed
    result |= _bytes(records, cfg, model, spec["world"])
    result |= _errors(records)
    if controller is not None:
        result["predicted"] = controller.last
        result["decisions"] = controller.decisions
        result["decision_ms"] = 1e3 * controller.decision_s / max(controller.decisions, 1)
        result["levels"] = {n: state.levels[n] for n in state.compressed_layers()}
    model.eval()
    with torch.no_grad():
        val = [
            float(model.loss(b))
            for b in eval_batches(corpus.val, spec["batch"], length, spec["eval_batches"])
        ]
    result |= {
        "dense_bytes_per_step": dense_bytes(model),
        "val_loss": sum(val) / len(val),
        "final_train_loss": float(loss.detach()),
        "compute_step_time_s": _compute_only(model, corpus, spec, gen),
    }
    return result


def _phase(controller, step: int) -> str:
    """What the L-GreCo controller does in `step`: "decide" (at its start), "observe"
    (measures every candidate's error), else "steady"."""
    if controller is None:
        return "steady"
    if controller.due(step):
        return "decide"
    return "observe" if controller.accumulating(step) else "steady"


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


def _bytes(records: list[dict], cfg: dict, model, world: int) -> dict:
    """Payload, modelled link bytes per rank and step; computed for torch's hooks."""
    from gradlane.comm import dense_bytes
    from gradlane.compressors import PowerSGD

    def mean(key):
        values = [r[key] for r in records if key in r]
        return sum(values) / len(values) if values else None

    payload, sent = mean("comm/bytes_per_step"), mean("comm/sent_bytes_per_step")
    if sent is not None:
        return {"bytes_per_step": payload, "sent_per_rank": sent}
    # torch's hooks and plain DDP count nothing: their payload, computed (all all-reduces)
    if cfg["hook"] == "torch_fp16":
        payload = dense_bytes(model) / 2
    elif cfg["hook"] == "torch_powersgd":
        psgd = PowerSGD(cfg["rank"])
        payload = sum(psgd.wire_bytes(p.shape, cfg["rank"]) for p in model.parameters())
    else:
        payload = dense_bytes(model)
    sent = 2 * (world - 1) / world * payload
    return {"bytes_per_step": payload, "sent_per_rank": sent, "bytes_computed": True}


def _errors(records: list[dict]) -> dict:
    residual = [r.get("comm/residual_sq", 0.0) for r in records]
    energy = [r.get("comm/grad_sq", 0.0) for r in records]
    if sum(energy) <= 0:
        return {}
    per_step = {"residual_sq_per_step": residual, "grad_sq_per_step": energy}
    return {"measured_error": sum(residual) / sum(energy)} | per_step


def _tx_bytes() -> int:
    return int(TX_BYTES.read_text())


def _compute_only(model, corpus, spec: dict, gen: torch.Generator) -> float:
    """Mean step time of a local copy trained without synchronisation, in this same run
    (all ranks at once, so under the same load as the synchronised steps)."""
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


def run_one(
    label: str, entry: dict, args: argparse.Namespace, steps: int, time_from: int, world: int
) -> dict:
    cfg = entry["comm"]
    spec = {
        "comm": cfg,
        "world": world,
        "steps": steps,
        "start_iter": args.start_iter,
        "time_from": time_from,
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
        "threads": args.threads,
        "port": _free_port(),
        "timeout_s": args.timeout_s,
        "own_loopback": bool(args.child),  # in a namespace of our own
        "engine": entry.get("engine", "ddp"),
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_rank, args=(spec, tmp), nprocs=world, join=True)
            result = json.loads(Path(tmp, "result.json").read_text())
        except Exception as exc:  # a hook that crashes is a result too
            result = {"failed": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"}
    times = result.get("step_times_s", [])
    if times:
        result["step_time_s"] = sum(times) / len(times)
        result["step_time_median_s"] = sorted(times)[len(times) // 2]
        result |= window_cost(times, result.get("step_phases", []))
    result |= {"config": label, "steps": steps, "world": world, "wall_s": time.time() - t0}
    result |= {"comm": cfg, "bucket_cap_mb": spec["bucket_cap_mb"]}
    brief = {k: result[k] for k in ("step_time_s", "bytes_per_step", "val_loss") if k in result}
    print(f"  {label:32s} {json.dumps(brief)} {result.get('failed', '')}", flush=True)
    return result


def window_cost(times: list[float], phases: list[str]) -> dict:
    """Steady step time (steps where the controller neither observes nor decides) and
    what one decision window costs on top: sum over its observe and decide steps of
    (time - steady mean), per decision timed. Empty without a timed decision."""
    steady = [t for t, p in zip(times, phases, strict=True) if p == "steady"]
    window = [t for t, p in zip(times, phases, strict=True) if p != "steady"]
    decisions = phases.count("decide")
    if not steady or not decisions:
        return {}
    mean = sum(steady) / len(steady)
    cost = (sum(window) - mean * len(window)) / decisions
    return {"steady_step_time_s": mean, "window_cost_s": cost}


def amortised(run: dict, adjust_every: int) -> float | None:
    """Mean step time with one decision window every `adjust_every` steps, from the
    run's measured steady step time and window cost."""
    if "window_cost_s" not in run:
        return None
    return run["steady_step_time_s"] + run["window_cost_s"] / adjust_every


def run_link(link: str, world: int, labels: dict, args: argparse.Namespace) -> list[dict]:
    if link == "loopback":
        steps, time_from = args.steps, args.start_iter
    else:
        steps = args.link_steps or args.start_iter + args.timed_steps
        time_from = max(args.start_iter, steps - args.timed_steps)
    print(f"[{link}, {world} ranks] {steps} steps per configuration, timed from step "
          f"{time_from}", flush=True)  # fmt: skip
    return [
        run_one(label, entry, args, steps, time_from, world)
        for label, entry in labels.items()
        if link == "loopback" or not entry.get("loopback_only")
    ]


def _in_netns(link: str, world: int) -> list[dict]:
    """This script run for one link inside a fresh network namespace (as root)."""
    ns = f"gl_bw_{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "runs.json")
        _sh("ip", "netns", "add", ns)
        try:
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            if RATES[link]:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                    "rate", RATES[link], "burst", "512kb", "latency", "20ms")  # fmt: skip
            cmd = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve())]
            cmd += [*sys.argv[1:], "--child", f"{link}:{world}:{out}"]
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
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


# ---------------------------------------------------------------- report


def _link_timing(meta: dict) -> str:
    """How the rate-limited links were run and timed (results older than `--link-steps`
    ran `--timed-steps` steps and timed those after warm-up)."""
    if "link_steps" not in meta:
        return f"{meta['timed_steps']} steps, step time: mean over those after warm-up"
    timed = min(meta["timed_steps"], meta["link_steps"] - meta["start_iter"])
    return f"{meta['link_steps']} steps, step time: mean over the last {timed}"


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with the measured numbers and met / missed."""
    out, rank = [], report["meta"]["rank"]
    runs = report["runs"]
    loop, slow = runs.get("loopback", {}), runs.get("100mbit", {})
    uni, lg = f"PowerSGD r{rank}", f"L-GreCo PowerSGD (r{rank})"
    if all("step_time_s" in slow.get(k, {}) for k in (uni, lg)):
        lg_slow, uni_slow = slow[lg], slow[uni]
        overhead = lg_slow["step_time_s"] / lg_slow["compute_step_time_s"]
        vs_uniform = lg_slow["step_time_s"] / uni_slow["step_time_s"]
        out.append(
            {
                "target": "at 100 Mbit/s L-GreCo PowerSGD steps <= 1.05x compute only (same "
                "run, unsynchronised) and no slower than uniform PowerSGD",
                "measured": f"{overhead:.3f}x compute only; {vs_uniform:.3f}x uniform's step "
                f"time ({lg_slow['bytes_per_step'] / uni_slow['bytes_per_step']:.2f}x its bytes)",
                "met": bool(overhead <= 1.05 and vs_uniform <= 1.0),
            }
        )
    if "val_loss" in loop.get(lg, {}) and "val_loss" in loop.get("plain DDP", {}):
        gap = loop[lg]["val_loss"] / loop["plain DDP"]["val_loss"] - 1
        out.append(
            {
                "target": "L-GreCo PowerSGD validation loss within 1% of plain DDP (loopback)",
                "measured": f"{100 * gap:+.2f}%",
                "met": bool(abs(gap) <= 0.01),
            }
        )
    if all("steady_step_time_s" in slow.get(k, {}) for k in (uni, lg)):
        uni_steady, adjust = slow[uni]["steady_step_time_s"], report["meta"]["adjust_every"]
        ratios = {n: amortised(slow[lg], n) / uni_steady for n in (adjust, DEFAULT_ADJUST_EVERY)}
        out.append(
            {
                "target": "at 100 Mbit/s L-GreCo PowerSGD no slower than uniform PowerSGD "
                "(steady steps; L-GreCo's decision windows amortised at adjust_every="
                f"{DEFAULT_ADJUST_EVERY}, the default)",
                "measured": f"steady {slow[lg]['steady_step_time_s'] / uni_steady:.3f}x "
                f"uniform's steady step; with its windows {ratios[DEFAULT_ADJUST_EVERY]:.3f}x "
                f"at adjust_every={DEFAULT_ADJUST_EVERY}, {ratios[adjust]:.3f}x at {adjust} "
                "(as run)",
                "met": bool(ratios[DEFAULT_ADJUST_EVERY] <= 1.0),
            }
        )
    alpha = report["meta"]["alpha"]
    for family, uniform in _families(report["configs"]).items():
        a, b = loop.get(family, {}), loop.get(uniform, {})
        if "measured_error" in a and "measured_error" in b:
            ratio = a["measured_error"] / b["measured_error"]
            pred = a.get("predicted", {}).get("error_ratio")
            out.append(
                {
                    "target": f"{family}: measured error <= alpha ({alpha:g}) x {uniform}'s",
                    "measured": f"{ratio:.3f}x (predicted {pred:.3f}x at the last decision); "
                    f"{b['bytes_per_step'] / a['bytes_per_step']:.2f}x fewer bytes",
                    "met": bool(ratio <= alpha),
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


def _families(labels: list[str]) -> dict[str, str]:
    """L-GreCo label -> its uniform label ("L-GreCo TopK (0.01)" -> "TopK 0.01")."""
    out = {}
    for label in labels:
        if label.startswith("L-GreCo "):
            name, level = label.removeprefix("L-GreCo ").split(" (", 1)
            out[label] = f"{name} {level.rstrip(')')}"
    return out


def _kb(x: float | None, mark: str = "") -> str:
    return "-" if x is None else f"{x / 1e3:,.1f} kB{mark}"


def main_table(report: dict) -> list[str]:
    links = [link for link in RATES if link in report["runs"]]
    head = ["configuration", "handed/step", "sent/rank (ring model)", "sent/rank (measured)",
            "vs all-reduce", "measured error", "predicted error", "val loss"]  # fmt: skip
    head += [f"step s ({link})" for link in links]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    loop = report["runs"].get("loopback", {})
    world = report["meta"]["world"]
    plain_sent = loop.get("plain DDP", {}).get("sent_per_rank")
    for label in report["configs"]:
        r = loop.get(label, {})
        mark = "*" if r.get("bytes_computed") else ""
        row = [label, _kb(r.get("bytes_per_step"), mark), _kb(r.get("sent_per_rank"), mark or "†")]
        row.append(_kb(r.get("measured_sent_per_rank")))
        ratio = plain_sent / r["sent_per_rank"] if plain_sent and r.get("sent_per_rank") else None
        row.append(f"{ratio:.1f}x" if ratio and world > 1 else "-")
        row.append(f"{r['measured_error']:.3f}" if "measured_error" in r else "-")
        pred = r.get("predicted", {}).get("predicted_error")
        row.append(f"{pred:.3f}‡" if pred is not None else "-")
        row.append(f"{r['val_loss']:.4f}" if "val_loss" in r else "-")
        row += [_time_cell(report["runs"][link].get(label, {})) for link in links]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def decision_table(report: dict) -> list[str]:
    """Per configuration with a controller and link: steady step, one decision window's
    measured cost, decide() alone, and the step time amortised at two adjust_every."""
    adjust = report["meta"]["adjust_every"]
    head = ["configuration", "link", "step s (timed mean)", "steady step s",
            "window cost s / decision", "decide() ms", f"amortised s, every {adjust}",
            f"amortised s, every {DEFAULT_ADJUST_EVERY}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for link, runs in report["runs"].items():
        for label, r in runs.items():
            if "window_cost_s" not in r:
                continue
            row = [label, link, f"{r['step_time_s']:.3f}", f"{r['steady_step_time_s']:.3f}"]
            row += [f"{r['window_cost_s']:+.3f}", f"{r.get('decision_ms', 0.0):.0f}"]
            row += [f"{amortised(r, n):.3f}" for n in (adjust, DEFAULT_ADJUST_EVERY)]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def scaling_table(report: dict) -> list[str]:
    """Per configuration and world size: modelled and measured bytes per rank."""
    worlds = report["meta"]["worlds"]
    head = ["configuration"]
    for w in worlds:
        head += [f"W={w} sent/rank (model)", f"W={w} measured", f"W={w} vs all-reduce"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in report["configs"]:
        row = [label]
        for w in worlds:
            runs = report["runs"].get(_link_key("loopback", w, worlds), {})
            r, plain = runs.get(label, {}), runs.get("plain DDP", {}).get("sent_per_rank")
            mark = "*" if r.get("bytes_computed") else "†"
            row += [_kb(r.get("sent_per_rank"), mark), _kb(r.get("measured_sent_per_rank"))]
            sent = r.get("sent_per_rank")
            row.append(f"{plain / sent:.1f}x" if plain and sent else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(report: dict) -> str:
    meta = report["meta"]
    scaling = len(meta["worlds"]) > 1
    text = [
        "# Comm hooks: side by side",
        "",
        f"`{meta['command']}`",
        "",
        "(as root: the script makes and removes its network namespaces itself)",
        "",
        f"{meta['model']} at {', '.join(map(str, meta['worlds']))} DDP ranks (gloo, "
        f"127.0.0.1), batch {meta['batch']} x {meta['context']} bytes per rank, "
        f"{meta['threads']} thread(s) per rank, bucket_cap_mb={meta['bucket_cap_mb']}, AdamW "
        f"lr {meta['lr']}; {meta['machine']}. Loopback: {meta['steps']} steps (validation "
        f"loss after them), step time: mean over the steps after the {meta['start_iter']} "
        f"warm-up steps; rate-limited links: {_link_timing(meta)}. In brackets, the step "
        f"time's ratio to the mean time of {meta['compute_steps']} unsynchronised steps "
        "timed right after, in the same run. Handed: the bytes one rank hands to the "
        "collectives per step (measured by the hook; * computed for torch's hooks and "
        "plain DDP). Sent/rank: the bytes each rank puts on the wire per step, † computed "
        "from the collectives' sizes by the ring model (all-reduce 2(W-1)/W, all-gather "
        "W-1 payloads), and measured: the namespace loopback's byte counter over the steps "
        "after warm-up / W (TCP/IP headers included; '-' where not root). vs all-reduce: "
        "plain DDP's sent/rank over this one's. Measured error: sum ||e'||^2 / sum ||g||^2 "
        "over the steps after warm-up; ‡ predicted (computed): the error model's figure at "
        "the last decision.",
        "",
    ]
    if scaling:
        text += ["## Bytes per rank as the world grows", "", *scaling_table(report), ""]
    else:
        text += main_table(report) + [""]
    crashed = [
        f"- crashed: {label} on {link}: {r['failed']}"
        for link, runs in report["runs"].items()
        for label, r in runs.items()
        if "failed" in r
    ]
    text += [*crashed, ""] if crashed else []
    if report.get("skipped"):
        text += [f"Links skipped: {report['skipped']}.", ""]
    decisions = decision_table(report)
    if len(decisions) > 2:
        text += ["## Decision cost", "", DECISION_NOTE, "", *decisions, ""]
    if report["targets"]:
        text += ["## Targets", ""]
        for t in report["targets"]:
            status = {True: "met", False: "missed", None: "not comparable"}[t["met"]]
            text.append(f"- **{status}**: {t['target']}: {t['measured']}")
    lg = report["runs"].get("loopback", {}).get(f"L-GreCo PowerSGD (r{meta['rank']})", {})
    if "levels" in lg:
        text += ["", "L-GreCo PowerSGD ranks at the end of the loopback run:", ""]
        text.append(", ".join(f"`{n}` {v}" for n, v in lg["levels"].items()))
    return "\n".join(text) + "\n"


DECISION_NOTE = (
    "Each step is tagged by what the controller does in it: observe (the last "
    "`--accumulate` steps before a decision: every candidate's error is measured), decide "
    "(the knapsack, at the start of the step), else steady. Steady step: the mean over "
    "steady timed steps. Window cost: the observe and decide steps' time above the steady "
    "mean, per decision timed; decide() ms: the controller's own wall time per decision "
    "(part of the window cost). Amortised: steady + window cost / adjust_every. Uniform "
    "hooks run a one-candidate predictor for the predicted-error column, a cost of the "
    "benchmark, not of the hook: their steady step is what the hook costs."
)


def _time_cell(run: dict) -> str:
    """'0.634 (1.13x)': mean step time and its ratio to the same run's unsynchronised steps."""
    if "step_time_s" not in run:
        return "crashed" if "failed" in run else "-"
    if "compute_step_time_s" not in run:
        return f"{run['step_time_s']:.3f}"
    return f"{run['step_time_s']:.3f} ({run['step_time_s'] / run['compute_step_time_s']:.2f}x)"


def _link_key(link: str, world: int, worlds: list[int]) -> str:
    return link if len(worlds) == 1 else f"{link} W={world}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    p.add_argument("--steps", type=int, default=100, help="steps per configuration on loopback")
    p.add_argument("--timed-steps", type=int, default=20, help="timed steps on rate-limited links")
    p.add_argument(
        "--link-steps",
        type=int,
        default=0,
        help="steps on rate-limited links, the last --timed-steps timed "
        "(default: --start-iter + --timed-steps)",
    )
    p.add_argument("--links", default="loopback,100mbit", help="of: " + ", ".join(RATES))
    p.add_argument("--worlds", default="2", help="comma-separated world sizes (ranks)")
    p.add_argument("--only", default="", help="comma-separated configuration labels to run")
    p.add_argument("--tag", default="", help="results go to comm_<tag>.json / .md")
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
    p.add_argument("--render", type=Path, help="only rewrite the tables from this JSON")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # link:world:out (netns)
    args = p.parse_args(argv)
    if args.link_steps and args.link_steps <= args.start_iter:
        p.error(f"--link-steps={args.link_steps} must be 0 or above --start-iter={args.start_iter}")
    if args.quick:
        args.steps, args.timed_steps, args.start_iter = 12, 8, 3
        args.adjust_every, args.accumulate, args.warmup = 4, 2, 4
        args.n_layer, args.d_model, args.n_head, args.context = 2, 64, 4, 32
        args.batch, args.max_bytes, args.eval_batches = 8, 300_000, 2
    if args.out is None:  # a smoke run never overwrites the real results
        args.out = Path(tempfile.gettempdir(), "gradlane-comm-quick") if args.quick else RESULTS
    args.worlds = [int(w) for w in args.worlds.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    name = f"comm_{args.tag}" if args.tag else "comm"
    if args.render:  # tables and targets again from a finished run's JSON
        write(json.loads(args.render.read_text()), args.out, name)
        return
    labels = configs(args)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        labels = {k: v for k, v in labels.items() if k in keep}
    if args.child:  # inside a namespace: run one link, hand the results back, done
        link, world, out = args.child.split(":", 2)
        Path(out).write_text(json.dumps(run_link(link, int(world), labels, args)))
        return

    report = {"configs": list(labels), "runs": {}, "skipped": ""}
    links = [s.strip() for s in args.links.split(",") if s.strip()]
    why = netns_available()
    for world in args.worlds:
        for link in links:
            key = _link_key(link, world, args.worlds)
            if why is None:
                runs = _in_netns(link, world)
            elif link == "loopback":  # the host's loopback: no byte counter of our own
                runs = run_link(link, world, labels, args)
            else:
                report["skipped"] = f"{', '.join(lk for lk in links if lk != 'loopback')} ({why})"
                print(f"[{link}] skipped: {why}", flush=True)
                continue
            report["runs"][key] = {r["config"]: r for r in runs}

    from gradlane.recipes.lm.model import GPT

    n_params = sum(
        p.numel() for p in GPT(args.n_layer, args.n_head, args.d_model, args.context).parameters()
    )
    report["meta"] = {
        "command": "python " + shlex.join(["benchmarks/comm.py", *(argv or sys.argv[1:])]),
        "model": f"GPT n_layer={args.n_layer} d_model={args.d_model} n_head={args.n_head} "
        f"({n_params / 1e6:.2f}M parameters)",
        "worlds": args.worlds,
        "world": args.worlds[0],
        "context": args.context,
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": args.timed_steps,
        "link_steps": args.link_steps or args.start_iter + args.timed_steps,
        "start_iter": args.start_iter,
        "rank": args.rank,
        "alpha": args.alpha,
        "adjust_every": args.adjust_every,
        "lr": args.lr,
        "threads": args.threads,
        "compute_steps": args.compute_steps,
        "bucket_cap_mb": args.bucket_cap_mb,
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    write(report, args.out, name)


def write(report: dict, out: Path, name: str) -> None:
    """Targets, <name>.json and <name>.md (the tables) under `out`."""
    report["targets"] = targets(report) if len(report["meta"]["worlds"]) == 1 else []
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
