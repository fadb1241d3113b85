"""`gradlane tune` on the local Ray: a 2-trial grid of 1-worker gradlane runs, MLflow child
runs of one parent, ASHA switched on, and a best-first table whose order is known."""

from __future__ import annotations

import re

import pytest
from conftest import TINY_LM
from mlflow.tracking import MlflowClient

from gradlane.cli import main
from gradlane.errors import ConfigError
from gradlane.runs import read_info
from gradlane.tune import parse_space

pytestmark = pytest.mark.slow


def test_sweep_stops_a_poor_trial_and_goes_on(local_ray, tmp_path, capsys):
    """Three 1-worker trials one after another; ASHA stops lr=0 at the step-3 rung, and
    the trial after it still gets its workers (Tune kills a stopped trial mid-run)."""
    args = [*TINY_LM, "run.steps=6", "run.eval_every=3", "trainer.num_workers=1",
            "debug.step_delay_s=0.5", f"run.output_dir={tmp_path}", "run.name=sweep"]  # fmt: skip
    rc = main(["tune", "lm", *args, "--space", "optimizer.lr=grid(0.01,0.0,0.005)", "--asha",
               "--metric", "val/loss", "--mode", "min", "--concurrent", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    table = out.split("best first:\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["trial", "optimizer.lr", "val/loss"]
    rows = {float(line.split()[1]): line for line in table[1:4]}
    assert float(table[1].split()[1]) == 0.01  # lr 0 cannot lower the loss: it ranks last
    assert float(table[3].split()[1]) == 0.0
    assert "KILLED (stopped early)" in rows[0.0]

    trials = sorted(p for p in (tmp_path / "sweep").iterdir() if (p / "run.json").exists())
    assert len(trials) == 3  # a run directory per trial
    infos = [read_info(p) for p in trials]
    client = MlflowClient(infos[0]["tracking_uri"])
    parents = {client.get_run(i["run_id"]).data.tags["mlflow.parentRunId"] for i in infos}
    (parent_id,) = parents
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["space.optimizer.lr"]
    assert "trials.txt" in {a.path for a in client.list_artifacts(parent_id)}
    children = [client.get_run(i["run_id"]) for i in infos]
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        if child.info.status == "KILLED":
            assert child.data.tags["gradlane.stopped_early"] == "asha"
        assert "val/loss" in child.data.metrics  # every trial's workers ran to a rung
    assert [c.info.status for c in children].count("FINISHED") >= 1


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optimizer.lr", "is not KEY=FN(ARGS)"),
        ("optimizer.lr=uniform(1)", "uniform takes two numbers"),
        ("optimizer.lr=loguniform(0,1)", "loguniform needs low > 0"),
        ("optimizer.lr=uniform(2,1)", "low must be below high"),
    ],
)
def test_bad_space_is_one_line(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_space([item])


def test_space_values_are_validated_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "lm", "run.output_dir=out", "--space", "optimizer.lr=choice(0.01,-1)"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "gradlane: error: optimizer.lr=-1.0 must be >= 0"
    assert list(tmp_path.iterdir()) == []
