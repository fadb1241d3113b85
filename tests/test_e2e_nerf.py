"""The nerf_distill recipe end to end through Ray Train (2 workers) and MLflow, and its
bad input rejected before anything is written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from gradlane.errors import ConfigError
from gradlane.launcher import prepare, run

# a 16-pixel scene with 6 training views and small fields: a run takes seconds
TINY_NERF = [
    "data.image_size=16", "data.train_views=6", "data.test_views=2", "data.rays_per_batch=96",
    "data.strip_views=2", "model.n_samples=16", "model.teacher_steps=60", "model.stage_steps=[2,4]",
    "model.grid_threshold=0.5",
    "model.grid_resolution=8", "model.hash.levels=4", "model.hash.table_log2=12",
    "model.hash.base_resolution=4", "model.hash.max_resolution=32", "model.hash.hidden=32",
    "model.mlp.width=32", "model.mlp.depth=3", "model.tensorf.resolution=16",
    "run.eval_every=8", "run.log_every=2", "trainer.checkpoint_every=8",
]  # fmt: skip


@pytest.mark.slow
def test_nerf_distill_through_ray_logs_teacher_and_student_and_reuses_the_teacher(
    local_ray, tmp_path
):
    cache = tmp_path / "cache"
    common = [*TINY_NERF, f"run.output_dir={tmp_path / 'runs'}", f"data.cache_dir={cache}"]
    first = run("nerf_distill", [*common, "run.steps=8", "comm.hook=fp16"], show_progress=False)
    client = MlflowClient(first.tracking_uri)
    metrics = client.get_run(first.run_id).data.metrics
    for key in ("val/psnr", "val/ssim", "val/teacher_psnr", "val/teacher_ssim", "train/loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/teacher_psnr"] > 12  # a white image alone scores about 9 dB here
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"nerf_strip.png", "nerf_eval.json", "teacher.pt", "loss.png"} <= artifacts
    strip = np.asarray(Image.open(first.run_dir / "artifacts" / "nerf_strip.png"))
    assert strip.shape == (2 * 16, 3 * 16, 3)  # ground truth | teacher | student, 2 views
    scores = json.loads((first.run_dir / "artifacts" / "nerf_eval.json").read_text())
    mean = sum(s["teacher"]["psnr"] for s in scores) / len(scores)
    assert mean == pytest.approx(metrics["val/teacher_psnr"], abs=1e-3)
    assert len(list((cache / "teachers").glob("hash-*.pt"))) == 1

    # the teacher saved by the first run, given as a checkpoint to a tensorf student
    teacher = first.run_dir / "artifacts" / "teacher.pt"
    second = run(
        "nerf_distill",
        [*common, "run.steps=4", "run.eval_every=4", "model.student=tensorf",
         f"model.teacher_checkpoint={teacher}", "optimizer.lr=0.02"],
        show_progress=False,
    )  # fmt: skip
    again = MlflowClient(second.tracking_uri).get_run(second.run_id).data.metrics
    assert again["val/teacher_psnr"] == pytest.approx(metrics["val/teacher_psnr"], abs=1e-4)
    assert math.isfinite(again["val/psnr"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.student=nerf", "model.student='nerf' is not allowed"),
        ("model.mlp.width=2.5", "model.mlp.width=2.5 has the wrong type"),
        ("model.hash.levles=4", "unknown key 'model.hash.levles'"),
        ("model.mlp.skip=9", r"model.mlp.skip=9 must be in \[0, mlp.depth=3\)"),
        ("model.stage_steps=[5]", r"model.stage_steps=\[5\] must be"),
        ("model.n_samples=abc", "model.n_samples='abc' has the wrong type"),
        ("data.background=[1,1]", r"data.background=\[1.0, 1.0\] must be 3 numbers"),
        ("data.downscale=0", "data.downscale=0 must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        prepare("nerf_distill", None, [*TINY_NERF, f"data.cache_dir={tmp_path}", override])
    assert "\n" not in str(info.value)


def test_bad_data_and_teacher_exit_2_before_anything_is_written(tmp_path, gradlane_cli):
    cache = tmp_path / "cache"
    base = [*TINY_NERF, f"data.cache_dir={cache}", f"run.output_dir={tmp_path / 'runs'}"]
    (tmp_path / "empty").mkdir()
    out = gradlane_cli("run", "nerf_distill", *base, f"data.path={tmp_path / 'empty'}")
    assert out.returncode == 2
    assert "transforms_train.json is missing" in out.stderr and len(out.stderr.splitlines()) == 1

    from gradlane.layers import MLPField, OccupancyGrid
    from gradlane.recipes.nerf_distill.train import save_teacher

    wrong = tmp_path / "mlp_teacher.pt"
    save_teacher(wrong, MLPField(1.0, width=32, depth=3), {}, OccupancyGrid(8, 1.0))
    out = gradlane_cli("run", "nerf_distill", *base, f"model.teacher_checkpoint={wrong}")
    assert out.returncode == 2
    assert "holds a 'mlp' field but model.teacher='hash'" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
