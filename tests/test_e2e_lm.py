"""End to end: `lm` on 2 Ray Train workers, MLflow read back, faults (an exception, a
SIGKILLed worker, a SIGTERMed driver), resume, init_from, checkpoint files and retention."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_LM
from mlflow.tracking import MlflowClient

from gradlane.checkpoint import all_checkpoints, latest_intact, load_model_weights, problem
from gradlane.errors import ConfigError
from gradlane.launcher import TrainingFailed, run
from gradlane.runs import list_runs, read_info

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = [*TINY_LM, f"run.steps={STEPS}", "run.eval_every=6", "trainer.checkpoint_every=4"]


def _weights(result) -> dict[str, torch.Tensor]:
    return load_model_weights(result.checkpoint)


def latest_checkpoint(run_dir: Path) -> Path | None:
    return latest_intact(run_dir / "ray", warn=False)


def _assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    """An uninterrupted run, the oracle for the fault and resume tests."""
    out = tmp_path_factory.mktemp("ref")
    return run("lm", [*COMMON, f"run.output_dir={out}", "run.name=ref"], show_progress=False)


def test_lm_trains_and_mlflow_has_params_metrics_artifacts(reference):
    lines = (reference.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train/loss"] for line in lines]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # bytes are learnable quickly

    client = MlflowClient(reference.tracking_uri)
    mlrun = client.get_run(reference.run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["run.steps"] == str(STEPS)
    assert mlrun.data.params["model.d_model"] == "32"
    history = client.get_metric_history(reference.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    for key in ("val/loss", "val/bits_per_byte", "lr", "samples_per_s", "comm/bytes_per_step"):
        assert key in mlrun.data.metrics, key
    assert mlrun.data.metrics["val/bits_per_byte"] < 8.0  # better than uniform bytes
    artifacts = {a.path for a in client.list_artifacts(reference.run_id)}
    assert {"config.yaml", "loss.png"} <= artifacts
    (row,) = list_runs(reference.run_dir.parent)
    assert row["name"] == "ref" and row["recipe"] == "lm" and row["status"] == "FINISHED"
    assert row["step"] == STEPS and row["mlflow run"] == reference.run_id
    assert row["train/loss"] == pytest.approx(losses[-1])


def test_checkpoint_stores_replicated_state_once_and_verifies(reference):
    ckpt = reference.checkpoint
    assert problem(ckpt) is None
    shared = torch.load(ckpt / "shared.pt", weights_only=False)
    assert {"optimizer", "scheduler", "hook"} <= set(shared)  # AdamW: equal on both ranks
    for r in range(2):
        own = torch.load(ckpt / f"rank{r}.pt", weights_only=False)
        assert set(own) == {"step", "rng"}  # no copy of AdamW per rank
    checkpoints = all_checkpoints(reference.run_dir / "ray")
    assert [c.name for c in checkpoints] == ["checkpoint_00000008", "checkpoint_00000012"]


def test_ranks_draw_from_their_own_random_streams(reference):
    states = [
        torch.load(reference.checkpoint / f"rank{r}.pt", weights_only=False)["rng"]["torch"]
        for r in range(2)
    ]
    assert not torch.equal(*states)  # seeded per rank: dropout masks differ across ranks


def test_sigkilled_worker_restarts_and_matches_uninterrupted(reference, tmp_path):
    result = run(
        "lm",
        [*COMMON, f"run.output_dir={tmp_path}", "run.name=fault", "trainer.max_failures=1",
         "debug.fail_at_step=7", "debug.fail_rank=1", "debug.fail_with=sigkill"],
        show_progress=False,
    )  # fmt: skip
    assert (result.run_dir / "ray" / ".fault_injected").exists()
    steps = [json.loads(x)["step"] for x in (result.run_dir / "metrics.jsonl").open()]
    assert steps.count(5) == 2  # steps 5..7 were trained twice: after the restart from step 4
    _assert_same_model(_weights(result), _weights(reference))
    assert read_info(result.run_dir)["status"] == "FINISHED"


def test_resume_a_crashed_run_reproduces_uninterrupted(reference, tmp_path):
    crash = [*COMMON, f"run.output_dir={tmp_path}", "run.name=crash", "debug.fail_at_step=9"]
    with pytest.raises(TrainingFailed, match="injected failure"):
        run("lm", crash, show_progress=False)
    run_dir = tmp_path / "crash"
    good = latest_checkpoint(run_dir)
    assert good.name == "checkpoint_00000008"
    broken = good.with_name("checkpoint_00000009")  # as if a crash cut its copy short
    shutil.copytree(good, broken)
    with (broken / "model.pt").open("r+b") as f:
        f.truncate(100)
    assert "model.pt does not match its manifest" in problem(broken)
    partial = good.with_name("checkpoint_00000010")  # no manifest written yet
    partial.mkdir()
    shutil.copy(good / "model.pt", partial / "model.pt")
    assert latest_checkpoint(run_dir) == good
    info = read_info(run_dir)
    status = MlflowClient(info["tracking_uri"])
    assert status.get_run(info["run_id"]).info.status == "FAILED" and info["status"] == "FAILED"
    with pytest.raises(ConfigError, match="checkpoint_00000009.*does not match its manifest"):
        run("lm", [f"resume={broken}"], show_progress=False)  # named explicitly: refused

    with pytest.warns(UserWarning, match="skipping checkpoint checkpoint_00000010"):
        resumed = run("lm", [f"resume={run_dir}"], show_progress=False)
    assert resumed.run_id == info["run_id"] and resumed.run_dir == run_dir
    assert status.get_run(info["run_id"]).info.status == "FINISHED"
    _assert_same_model(_weights(resumed), _weights(reference))


def test_sigterm_to_the_driver_marks_killed_and_resume_continues_exactly(
    reference, tmp_path, gradlane_cli
):
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("gradlane")
    args = [*COMMON, f"run.output_dir={tmp_path}", "run.name=term", "debug.step_delay_s=0.4"]
    proc = subprocess.Popen(
        [str(exe), "run", "lm", *args, "ray.num_cpus=2", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run_dir = tmp_path / "term"
    deadline = time.time() + 240
    while latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    info = read_info(run_dir)
    assert info["status"] == "KILLED"
    assert MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).info.status == "KILLED"
    assert latest_checkpoint(run_dir).name != f"checkpoint_{STEPS:08d}"  # stopped mid-way

    resumed = run("lm", [f"resume={run_dir}", "debug.step_delay_s=0"], show_progress=False)
    _assert_same_model(_weights(resumed), _weights(reference))
    assert (run_dir / "resume-2.yaml").read_text().strip() == "debug:\n  step_delay_s: 0.0"


def test_resume_checks_then_extends_keeping_the_original_config(reference, tmp_path):
    run_dir = Path(shutil.copytree(reference.run_dir, tmp_path / "copy"))
    (run_dir / "run.json").write_text(
        json.dumps({**json.loads((run_dir / "run.json").read_text()), "run_id": None})
    )
    original = (run_dir / "config.yaml").read_text()
    ckpt = latest_checkpoint(run_dir)
    for override, message in [
        ("trainer.num_workers=1", "written by 2 workers"),
        (f"run.steps={STEPS}", f"run.steps={STEPS} is not above the checkpoint's step {STEPS}"),
        ("model.d_model=64", "'tok.weight' has shape (256, 32) there but (256, 64)"),
        ("optimizer.name=sgd", "optimizer.name='sgd': the run was trained with"),
        (f"init_from={ckpt}", "starts a new run; resume= continues one"),
    ]:
        with pytest.raises(ConfigError) as err:
            run("lm", [f"resume={ckpt}", f"run.steps={STEPS + 2}", override], show_progress=False)
        assert message in str(err.value)

    more = run("lm", [f"resume={ckpt}", f"run.steps={STEPS + 2}"], show_progress=False)
    assert latest_checkpoint(run_dir).name == f"checkpoint_{STEPS + 2:08d}"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()]
    assert steps[-2:] == [STEPS + 1, STEPS + 2]
    assert more.run_id != reference.run_id
    assert (run_dir / "config.yaml").read_text() == original
    assert (run_dir / "resume-2.yaml").read_text().strip() == f"run:\n  steps: {STEPS + 2}"
    # retention across attempts: the newest 2 (12 from attempt 1, 14 from attempt 2)
    names = [c.name for c in all_checkpoints(run_dir / "ray")]
    assert names == [f"checkpoint_{STEPS:08d}", f"checkpoint_{STEPS + 2:08d}"]


def test_init_from_starts_a_new_run_from_the_weights(reference, tmp_path):
    branch = run(
        "lm",
        [*COMMON, f"run.output_dir={tmp_path}", "run.steps=2", "optimizer.lr=0",
         "optimizer.warmup_steps=0", f"init_from={reference.run_dir}"],
        show_progress=False,
    )  # fmt: skip
    assert branch.run_id != reference.run_id
    _assert_same_model(_weights(branch), _weights(reference))  # lr 0: the weights it started from
    with pytest.raises(ConfigError, match="init_from=.*'tok.weight' has shape"):
        run("lm", [*COMMON, "model.d_model=64", f"init_from={reference.run_dir}"])
