"""End to end: `lm` on 2 Ray Train workers, MLflow read back, faults, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_LM
from mlflow.tracking import MlflowClient

from gradlane.errors import ConfigError
from gradlane.launcher import TrainingFailed, latest_checkpoint, run
from gradlane.training import load_model_weights

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = [*TINY_LM, f"run.steps={STEPS}", "run.eval_every=6", "trainer.checkpoint_every=4"]


def _weights(result) -> dict[str, torch.Tensor]:
    return load_model_weights(result.checkpoint)


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


def test_ranks_draw_from_their_own_random_streams(reference):
    states = [
        torch.load(reference.checkpoint / f"rank{r}.pt", weights_only=False)["rng"]["torch"]
        for r in range(2)
    ]
    assert not torch.equal(*states)  # seeded per rank: dropout masks differ across ranks


def test_worker_failure_restarts_and_matches_uninterrupted(reference, tmp_path):
    result = run(
        "lm",
        [*COMMON, f"run.output_dir={tmp_path}", "run.name=fault", "trainer.max_failures=1",
         "debug.fail_at_step=7", "debug.fail_rank=1"],
        show_progress=False,
    )  # fmt: skip
    assert (result.run_dir / ".fault_injected").exists()
    steps = [json.loads(x)["step"] for x in (result.run_dir / "metrics.jsonl").open()]
    assert steps.count(5) == 2  # steps 5..7 were trained twice: after the restart from step 4
    _assert_same_model(_weights(result), _weights(reference))


def test_resume_a_crashed_run_reproduces_uninterrupted(reference, tmp_path):
    crash = [*COMMON, f"run.output_dir={tmp_path}", "run.name=crash", "debug.fail_at_step=9"]
    with pytest.raises(TrainingFailed, match="injected failure"):
        run("lm", crash, show_progress=False)
    run_dir = tmp_path / "crash"
    good = latest_checkpoint(run_dir)
    assert good.name == "checkpoint_00000008"
    partial = good.with_name("checkpoint_00000009")  # as if a crash cut its upload short
    partial.mkdir()
    shutil.copy(good / "model.pt", partial / "model.pt")
    assert latest_checkpoint(run_dir) == good
    status = MlflowClient(json.loads((run_dir / "run.json").read_text())["tracking_uri"])
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert status.get_run(run_id).info.status == "FAILED"

    resumed = run("lm", [f"resume={run_dir}"], show_progress=False)
    assert resumed.run_id == run_id and resumed.run_dir == run_dir
    assert status.get_run(run_id).info.status == "FINISHED"
    _assert_same_model(_weights(resumed), _weights(reference))


def test_resume_a_finished_run_from_its_checkpoint_extends_it(reference, tmp_path):
    run_dir = Path(shutil.copytree(reference.run_dir, tmp_path / "copy"))
    (run_dir / "run.json").write_text(
        json.dumps({**json.loads((run_dir / "run.json").read_text()), "run_id": None})
    )
    ckpt = latest_checkpoint(run_dir)
    with pytest.raises(ConfigError, match="written by 2 workers"):
        run("lm", [f"resume={ckpt}", "trainer.num_workers=1"], show_progress=False)

    more = run("lm", [f"resume={ckpt}", f"run.steps={STEPS + 2}"], show_progress=False)
    assert latest_checkpoint(run_dir).name == f"checkpoint_{STEPS + 2:08d}"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()]
    assert steps[-2:] == [STEPS + 1, STEPS + 2]
    assert more.run_id != reference.run_id
