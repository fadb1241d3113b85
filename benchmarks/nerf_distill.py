"""Progressive volume distillation vs training from images, on the generated scene.

One process: a hash-grid teacher is trained from the training images, or
loaded from `--cache-dir` where an earlier run (e.g. `--teacher-only`) left it:
the teacher is given, as in the paper, and its training is not timed. Then an
MLP is (a) distilled from the teacher and (b) trained from the images with the
same rays and samples per step, and the tensorf and plenoxel students are
distilled too. The teacher's targets (samples, densities, colours, features,
pixels) are computed for a pool of `--pool-rays` random-pose rays at once and
reused for `--pool-refresh` steps (inside the distillation clock). With
`--plenoxel-upsample STEP RES` the Plenoxel student trains coarse to fine (its
grid resampled to RES^3 at STEP); `--min-lr-ratio` sets where each student's
learning rate ends. Every
`--eval-every` student steps (`--scratch-eval-every` for the MLP from images)
and at the last step each field renders all test views (outside the training
clock). The common PSNR is the from-scratch MLP's final test PSNR; the table
reports the training time each run takes to first reach it, the speed-up of
distillation over training from images, every field's final PSNR / SSIM, and each
student's PSNR against the teacher's own renders of the test views.

Targets: distillation reaches the common PSNR >= 5x faster than training from
images; every distilled student ends within 1 dB of its teacher.

Needs only torch, numpy and Pillow (matplotlib, when present, draws the curves):

    python benchmarks/nerf_distill.py                       # CPU, all students
    python benchmarks/nerf_distill.py --device cuda --students mlp --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_model

from gradlane.layers import OccupancyGrid, build_field, psnr
from gradlane.recipes.nerf_distill.data import load_views
from gradlane.recipes.nerf_distill.distill import (
    GridSchedule,
    LossWeights,
    RenderSettings,
    distill_fields,
    fit_images,
    image_scores,
    render_image,
)
from gradlane.recipes.nerf_distill.scene import generated_scene

RESULTS = Path(__file__).resolve().parent / "results"
SPEEDUP_TARGET, GAP_TARGET_DB = 5.0, 1.0
LOCAL_ARGS = (
    "out",
    "cache_dir",
    "render",
    "teacher_only",
)  # paths and modes, not recorded in the JSON
# the fields of the run (the recipe's defaults) and each one's learning rate
FIELD_SETTINGS = {
    "mlp": {"width": 64, "depth": 4, "freqs": 8, "skip": 2},
    "hash": {"levels": 12, "table_log2": 17, "base_resolution": 16, "max_resolution": 512},
    "tensorf": {"resolution": 64, "density_rank": 8, "color_rank": 16},
    "plenoxel": {"resolution": 48, "sh_degree": 2},
}
SCRATCH_LR = {"mlp": 0.004, "hash": 0.01, "tensorf": 0.02, "plenoxel": 0.1}
DISTILL_LR = {"mlp": 0.01, "hash": 0.01, "tensorf": 0.02, "plenoxel": 0.1}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and table")
    p.add_argument("--cache-dir", default="~/.cache/gradlane/nerf", help="where the scene is kept")
    p.add_argument("--size", type=int, default=128, help="image side (pixels)")
    p.add_argument("--train-views", type=int, default=100)
    p.add_argument("--test-views", type=int, default=20)
    p.add_argument("--rays", type=int, default=1024, help="rays per step")
    p.add_argument("--samples", type=int, default=48, help="samples per ray")
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--teacher-rays", type=int, default=1024, help="rays per teacher step")
    p.add_argument("--scratch-steps", type=int, default=6000)
    p.add_argument("--distill-steps", type=int, nargs="+", default=[2500],
                   help="steps of each student (in --students order), or one for all")  # fmt: skip
    p.add_argument("--stage-ends", type=int, nargs=2, default=[50, 150])
    p.add_argument("--loss-feature", type=float, default=0.1,
                   help="weight of the stage-1 term (kept in stages 2-3)")  # fmt: skip
    p.add_argument("--loss-rgb", type=float, default=4.0, help="weight of the stage-3 term")
    p.add_argument("--pool-rays", type=int, nargs="+", default=[16384],
                   help="teacher targets computed for this many random-pose rays at once and "
                   "reused (0: the teacher on fresh rays every step); one per student or "
                   "one for all")  # fmt: skip
    p.add_argument("--pool-refresh", type=int, default=128,
                   help="student steps between new pools (each ray is used "
                   "refresh * rays / pool-rays times)")  # fmt: skip
    p.add_argument("--min-lr-ratio", type=float, nargs="+", default=[0.1],
                   help="each student's learning rate decays exponentially to this fraction "
                   "of its start; one per student or one for all")  # fmt: skip
    p.add_argument("--plenoxel-upsample", type=int, nargs=2, metavar=("STEP", "RES"),
                   help="coarse to fine: the plenoxel student's grid is resampled to RES^3 "
                   "at STEP")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=250, help="test PSNR every N student steps")
    p.add_argument("--scratch-eval-every", type=int, default=500,
                   help="test PSNR every N steps of the MLP from images (its time to the "
                   "common PSNR is its last step's, whatever the spacing)")  # fmt: skip
    p.add_argument("--students", default="mlp,tensorf,plenoxel")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true", help="only redo table and plot from the JSON")
    p.add_argument("--teacher-only", action="store_true", help="only train and cache the teacher")
    args = p.parse_args()
    if args.plenoxel_upsample and args.plenoxel_upsample[1] < 2:
        p.error(f"--plenoxel-upsample RES={args.plenoxel_upsample[1]} must be >= 2")
    if not all(0 < r <= 1 for r in args.min_lr_ratio):
        p.error(f"--min-lr-ratio {args.min_lr_ratio}: each must be in (0, 1]")
    return args


def _machine(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


class Curve:
    """Training seconds (the device synchronised after each step) and, every `every`
    steps and at the last (`total`), PSNR / SSIM on all test views, rendered outside
    the clock; with `reference` (the teacher's renders of the test views) also the PSNR
    against those: how closely a student reproduces its teacher."""

    def __init__(self, field, test, settings, every: int, total: int, label: str,
                 reference: list[torch.Tensor] | None = None):  # fmt: skip
        self.field, self.test, self.settings = field, test, settings
        self.reference = reference
        self.every, self.total = every, total
        self.label, self.points, self.clock = label, [], 0.0
        self.device = settings.background.device
        self.last = time.perf_counter()

    def __call__(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.clock += time.perf_counter() - self.last
        if step % self.every == 0 or step == self.total:
            point = {"step": step, "seconds": self.clock, **self._scores()}
            self.points.append(point)
            print(f"  {self.label:<22} step {step:>5} {self.clock:7.1f} s  "
                  f"PSNR {point['psnr']:6.2f}", flush=True)  # fmt: skip
        self.last = time.perf_counter()

    def _scores(self) -> dict[str, float]:
        """Mean PSNR / SSIM over the test views (and PSNR to the reference renders)."""
        images = test_renders(self.field, self.test, self.settings)
        rows = [image_scores(im, self.test.images[i].to(im.device)) for i, im in enumerate(images)]
        scores = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim")}
        if self.reference is not None:
            pairs = zip(images, self.reference, strict=True)
            scores["psnr_teacher"] = sum(psnr(a, b).item() for a, b in pairs) / len(images)
        return scores

    @property
    def final(self) -> dict:
        return self.points[-1]

    def time_to(self, psnr: float) -> float | None:
        """Training seconds at the first evaluation reaching `psnr` (None: never)."""
        return next((p["seconds"] for p in self.points if p["psnr"] >= psnr), None)


def test_renders(field, test, settings: RenderSettings) -> list[torch.Tensor]:
    """`field`'s images of every test view, clamped to [0, 1] as they are scored."""
    return [render_image(field, c2w, test, settings).clamp(0, 1) for c2w in test.c2w]


def _field(arch: str, seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_field(arch, 1.0, 15, **FIELD_SETTINGS[arch]).to(device)


def _settings(args, device, grid: OccupancyGrid | None = None) -> RenderSettings:
    grid = grid if grid is not None else OccupancyGrid(32, 1.0)
    return RenderSettings(1.0, args.samples, torch.ones(3, device=device), grid.to(device))


def _teacher(args, train, test, device) -> tuple[torch.nn.Module, RenderSettings, dict]:
    """The hash teacher trained from the images, its render settings (with its occupancy
    grid) and its final test scores. The teacher is given, as in the paper: it is
    trained once, kept under `--cache-dir` and its training time is not compared."""
    field = "-".join(f"{k}{v}" for k, v in FIELD_SETTINGS["hash"].items())
    key = (f"teacher-hash-{field}-{args.size}px-{args.train_views}train-{args.teacher_steps}"
           f"steps-{args.teacher_rays}rays-{args.samples}samples-seed{args.seed}.pt")  # fmt: skip
    path = Path(args.cache_dir).expanduser() / key
    teacher = _field("hash", args.seed, device)
    settings = _settings(args, device)
    if path.exists():
        print(f"teacher: hash, cached in {path}", flush=True)
        saved = torch.load(path, map_location=device)
        teacher.load_state_dict(saved["field"])
        settings.grid = OccupancyGrid.from_state(saved["grid"]).to(device)
        return teacher, settings, saved["final"]
    print(f"teacher: hash, {args.teacher_steps} steps from images", flush=True)
    steps = args.teacher_steps
    curve = Curve(teacher, test, settings, steps, steps, "hash teacher")
    fit_images(teacher, teacher, train, settings, steps, SCRATCH_LR["hash"], args.teacher_rays,
               args.seed, GridSchedule(), curve)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"field": teacher.state_dict(), "grid": settings.grid.state_dict()}
    torch.save({**state, "final": curve.final}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return teacher, settings, curve.final


def _per_student(values: list, archs: list[str], flag: str) -> dict:
    """{student: value} from one value for all or one per student."""
    if len(values) not in (1, len(archs)):
        raise SystemExit(f"{flag}: give one value or one per student ({len(archs)})")
    return dict(zip(archs, values * (len(archs) if len(values) == 1 else 1), strict=True))


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = generated_scene(args.cache_dir, args.size, args.train_views, args.test_views)
    white = torch.ones(3)
    train = load_views(root, "train", white).to(device)
    test = load_views(root, "test", white).to(device)
    every = args.eval_every

    teacher, t_settings, t_final = _teacher(args, train, test, device)
    if args.teacher_only:
        return {}

    print(f"mlp from images, {args.scratch_steps} steps", flush=True)
    scratch = _field("mlp", args.seed + 1, device)
    s_settings = _settings(args, device)
    s_curve = Curve(scratch, test, s_settings, args.scratch_eval_every, args.scratch_steps,
                    "mlp from images")  # fmt: skip
    fit_images(scratch, scratch, train, s_settings, args.scratch_steps, SCRATCH_LR["mlp"],
               args.rays, args.seed + 1, GridSchedule(), s_curve)  # fmt: skip
    target = s_curve.final["psnr"]

    reference = test_renders(teacher, test, t_settings)
    students, archs = {}, args.students.split(",")
    steps = _per_student(args.distill_steps, archs, "--distill-steps")
    pool_rays = _per_student(args.pool_rays, archs, "--pool-rays")
    min_lr_ratio = _per_student(args.min_lr_ratio, archs, "--min-lr-ratio")
    for arch in archs:
        print(f"hash -> {arch} distillation, {steps[arch]} steps", flush=True)
        student = _field(arch, args.seed + 2, device)
        d_settings = _settings(args, device, OccupancyGrid.from_state(t_settings.grid.state_dict()))
        curve = Curve(student, test, d_settings, every, steps[arch], f"hash -> {arch}",
                      reference)  # fmt: skip
        weights = LossWeights(feature=args.loss_feature, rgb=args.loss_rgb)
        upsample = args.plenoxel_upsample if arch == "plenoxel" else None
        distill_fields(student, teacher, train, d_settings, steps[arch],
                       tuple(args.stage_ends), DISTILL_LR[arch], args.rays, args.seed + 2,
                       weights, curve, pool_rays[arch], args.pool_refresh,
                       upsample and tuple(upsample), min_lr_ratio[arch])  # fmt: skip
        students[arch] = curve

    scratch_time = s_curve.time_to(target)
    rows = {
        "teacher": {"arch": "hash", "steps": args.teacher_steps, **t_final},
        "scratch": {
            "arch": "mlp",
            "steps": args.scratch_steps,
            "curve": s_curve.points,
            "seconds_to_target": scratch_time,
            **s_curve.final,
        },  # fmt: skip
        "students": {},
    }
    for arch, curve in students.items():
        seconds = curve.time_to(target)
        rows["students"][arch] = {
            "steps": steps[arch],
            "curve": curve.points,
            "seconds_to_target": seconds,
            "speedup": scratch_time / seconds if seconds else None,
            "gap_to_teacher_db": t_final["psnr"] - curve.final["psnr"],
            **curve.final,
        }
    return {
        "device": args.device,
        "machine": _machine(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in LOCAL_ARGS},
        "fields": FIELD_SETTINGS,
        "target_psnr": target,
        **rows,
    }


def table(result: dict) -> str:
    """The markdown table of one run."""
    target = result["target_psnr"]
    t = result["teacher"]
    lines = [
        f"{result['machine']} ({result['device']}, torch {result['torch']}, "
        f"{result['threads']} threads); common PSNR = {target:.2f} dB "
        "(the from-scratch MLP's final test PSNR)",
        "",
        "| run | steps | train s | final PSNR | final SSIM | s to common PSNR | speed-up "
        "| gap to teacher | PSNR to teacher |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| hash teacher (from images) | {t['steps']} | {t['seconds']:.1f} | {t['psnr']:.2f} "
        f"| {t['ssim']:.3f} | | | | |",
    ]
    s = result["scratch"]
    lines.append(
        f"| mlp from images | {s['steps']} | {s['seconds']:.1f} | {s['psnr']:.2f} "
        f"| {s['ssim']:.3f} | {s['seconds_to_target']:.1f} | 1.0x | | |"
    )
    for arch, r in result["students"].items():
        reach = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] else "not reached"
        speed = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        to_teacher = f"{r['psnr_teacher']:.2f}" if "psnr_teacher" in r else "-"
        lines.append(
            f"| hash -> {arch} (distilled) | {r['steps']} | {r['seconds']:.1f} "
            f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {reach} | {speed} "
            f"| {r['gap_to_teacher_db']:+.2f} dB | {to_teacher} |"
        )
    mlp = result["students"].get("mlp")
    if mlp:
        met = mlp["speedup"] is not None and mlp["speedup"] >= SPEEDUP_TARGET
        lines += ["", f"Target distillation >= {SPEEDUP_TARGET:g}x faster (hash -> mlp): "
                  f"{'met' if met else 'NOT met'}"]  # fmt: skip
    gaps = {a: r["gap_to_teacher_db"] for a, r in result["students"].items()}
    ok = all(g <= GAP_TARGET_DB for g in gaps.values())
    lines.append(
        f"Target every student within {GAP_TARGET_DB:g} dB of its teacher: "
        f"{'met' if ok else 'NOT met'} ({', '.join(f'{a} {g:+.2f}' for a, g in gaps.items())})"
    )
    return "\n".join(lines)


def _first_time(points: list[dict], psnr: float) -> float | None:
    return next((p["seconds"] for p in points if p["psnr"] >= psnr), None)


def threshold_table(result: dict, levels: tuple[float, ...] = (26.0, 28.0, 29.0, 30.0)) -> str:
    """Training seconds each run first reaches each PSNR level, and the speed-up of
    each distilled student over the MLP trained from images."""
    runs = {"mlp from images": result["scratch"]["curve"]}
    runs |= {f"hash -> {a} (distilled)": r["curve"] for a, r in result["students"].items()}
    lines = [
        "| run | " + " | ".join(f"s to {v:g} dB (speed-up)" for v in levels) + " |",
        "| --- |" + " ---: |" * len(levels),
    ]
    base = {v: _first_time(runs["mlp from images"], v) for v in levels}
    for label, points in runs.items():
        cells = []
        for v in levels:
            t = _first_time(points, v)
            if t is None:
                cells.append("not reached")
            elif base[v] is None or label == "mlp from images":
                cells.append(f"{t:.1f}")
            else:
                cells.append(f"{t:.1f} ({base[v] / t:.1f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """Test PSNR against training seconds (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    curves = {"mlp from images": result["scratch"]["curve"]}
    curves |= {f"hash -> {a} (distilled)": r["curve"] for a, r in result["students"].items()}
    for label, points in curves.items():
        ax.plot([p["seconds"] for p in points], [p["psnr"] for p in points], marker=".",
                label=label)  # fmt: skip
    ax.axhline(result["target_psnr"], color="gray", ls="--", lw=1, label="common PSNR")
    ax.axhline(result["teacher"]["psnr"], color="black", ls=":", lw=1, label="hash teacher")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("test PSNR (dB)")
    ax.set_title(f"PVD vs training from images ({result['device']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    args = _args()
    name = "nerf_distill" if args.device == "cpu" else f"nerf_distill_{args.device}"
    if args.render:  # rewrite the table and plot from an earlier run's JSON
        result = json.loads((args.out / f"{name}.json").read_text())
    else:
        result = run(args)
        if args.teacher_only:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = f"{table(result)}\n\n{threshold_table(result)}"
    (args.out / f"{name}.md").write_text(text + "\n")
    plot(result, args.out / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
