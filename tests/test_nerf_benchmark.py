"""benchmarks/nerf_distill.py: runs on tiny settings (CPU, and CUDA where present) and
needs only torch, numpy and Pillow."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "nerf_distill.py"
TINY = ["--size", "16", "--train-views", "4", "--test-views", "2", "--teacher-steps", "6",
        "--scratch-steps", "6", "--distill-steps", "6", "3", "--eval-every", "3",
        "--scratch-eval-every", "3", "--stage-ends", "2", "4", "--rays", "64", "--samples", "8",
        "--students", "mlp,plenoxel", "--pool-rays", "128", "0", "--pool-refresh", "2",
        "--plenoxel-upsample", "2", "63", "--min-lr-ratio", "0.01", "0.1"]  # fmt: skip


def test_benchmark_imports_nothing_beyond_torch_numpy_and_pillow():
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"  # as when run as a script
        f"spec = importlib.util.spec_from_file_location('bench', {str(SCRIPT)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = {'ray', 'mlflow', 'omegaconf', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _run(tmp_path, device: str) -> dict:
    out = tmp_path / "out"
    args = [*TINY, "--device", device, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    name = "nerf_distill" if device == "cpu" else f"nerf_distill_{device}"
    result = json.loads((out / f"{name}.json").read_text())
    assert set(result["students"]) == {"mlp", "plenoxel"}
    assert [p["step"] for p in result["scratch"]["curve"]] == [3, 6]
    assert result["target_psnr"] == result["scratch"]["psnr"]
    assert result["scratch"]["seconds_to_target"] is not None
    table = (out / f"{name}.md").read_text()
    assert [p["step"] for p in result["students"]["plenoxel"]["curve"]] == [3]  # its own steps
    assert result["settings"]["plenoxel_upsample"] == [2, 63]
    assert result["settings"]["min_lr_ratio"] == [0.01, 0.1]
    assert "| hash -> plenoxel (distilled) | 3 |" in table and "Target every student" in table
    for student in result["students"].values():  # scored against the teacher's renders too
        assert all(math.isfinite(p["psnr_teacher"]) for p in student["curve"])
        assert student["psnr_teacher"] == student["curve"][-1]["psnr_teacher"]
    assert "| PSNR to teacher |" in table
    return result


def test_benchmark_runs_on_tiny_settings_with_the_teacher_cached_beforehand(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out")]
    subprocess.run([sys.executable, str(SCRIPT), *TINY, *cache, "--teacher-only"], check=True,
                   timeout=600)  # fmt: skip
    assert not (tmp_path / "out").exists()
    (teacher,) = (tmp_path / "c").glob("teacher-hash-*-16px-*.pt")
    written = teacher.stat().st_mtime_ns
    result = _run(tmp_path, "cpu")
    assert result["device"] == "cpu" and result["teacher"]["steps"] == 6
    assert teacher.stat().st_mtime_ns == written  # loaded, not trained again
    assert result["teacher"]["psnr"] == torch.load(teacher)["final"]["psnr"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_benchmark_runs_on_cuda(tmp_path):
    result = _run(tmp_path, "cuda")
    assert result["machine"] == torch.cuda.get_device_name()


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--min-lr-ratio", "0"], "--min-lr-ratio [0.0]: each must be in (0, 1]"),
        (["--plenoxel-upsample", "10", "1"], "--plenoxel-upsample RES=1 must be >= 2"),
    ],
)
def test_bad_options_are_one_line_errors_before_anything_runs(tmp_path, bad, message):
    args = [*bad, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().endswith(message), done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()
