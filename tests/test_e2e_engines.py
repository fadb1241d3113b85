"""End to end through the Ray launcher with `trainer.engine=deepspeed` and `horovod`
(2 workers, gloo): the loss falls, bytes are reported, every rank holds the same model,
and a run restarted from its checkpoint (DeepSpeed's `save_checkpoint` files, Horovod's
optimizer state) ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LM
from mlflow.tracking import MlflowClient

from gradlane.checkpoint import load_model_weights
from gradlane.comm import dense_bytes
from gradlane.launcher import run
from gradlane.recipes.lm.model import GPT

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = [*TINY_LM, f"run.steps={STEPS}", "run.eval_every=6", "trainer.checkpoint_every=4"]
LGRECO = ["comm.hook=lgreco", "comm.rank=2", "comm.start_iter=2", "comm.adjust_every=4",
          "comm.accumulate=2"]  # fmt: skip
MFAC = ["optimizer.name=mfac", "optimizer.lr=0.02", "optimizer.ngrads=8", "optimizer.damp=0.001"]
FAULT = ["trainer.max_failures=1", "debug.fail_at_step=7", "debug.fail_rank=1"]
DENSE = dense_bytes(GPT(n_layer=1, d_model=32, n_head=2, context=32))


def _records(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]


def _check_trained(result, engine: str, max_bytes: float) -> dict[str, float]:
    """Loss falls, MLflow has the run, every rank ends with the same weights."""
    losses = [r["train/loss"] for r in _records(result) if "train/loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    mlrun = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["trainer.engine"] == engine
    metrics = mlrun.data.metrics
    assert metrics["ranks/weight_spread"] == 0.0
    assert 0 < metrics["comm/bytes_per_step"] <= max_bytes
    return metrics


def _same_weights(a, b, atol: float = 1e-6) -> None:
    wa, wb = load_model_weights(a.checkpoint), load_model_weights(b.checkpoint)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key].float(), wb[key].float(), rtol=0, atol=atol, msg=key)


def _run(tmp_path, name: str, *overrides: str):
    return run(
        "lm", [*COMMON, *overrides, f"run.output_dir={tmp_path}", f"run.name={name}"],
        show_progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deepspeed_reference(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    return _run(out, "ref", "trainer.engine=deepspeed", *MFAC, *LGRECO)


def test_deepspeed_runs_lm_with_mfac_and_lgreco(deepspeed_reference):
    metrics = _check_trained(deepspeed_reference, "deepspeed", 0.6 * DENSE)
    assert metrics["comm/dense_bytes_per_step"] == DENSE
    assert metrics["comm/decisions"] >= 2
    assert metrics["mfac/skipped_steps"] == 0  # M-FAC's own numbers, beneath DeepSpeed
    files = deepspeed_reference.checkpoint / "deepspeed"
    assert (files / "latest").read_text() == "state"
    assert list((files / "state").glob("*model_states.pt"))


def test_deepspeed_restart_from_its_checkpoint_matches_uninterrupted(deepspeed_reference, tmp_path):
    result = _run(tmp_path, "fault", "trainer.engine=deepspeed", *MFAC, *LGRECO, *FAULT)
    assert [r["step"] for r in _records(result)].count(5) == 2  # steps 5..7 ran twice
    _same_weights(result, deepspeed_reference)


def test_deepspeed_zero2_bf16_accumulation_with_mfac(local_ray, tmp_path):
    result = _run(
        tmp_path, "zero2", "trainer.engine=deepspeed", "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16", "deepspeed.gradient_accumulation_steps=2", *MFAC,
    )  # fmt: skip
    metrics = _check_trained(result, "deepspeed", DENSE)
    assert metrics["comm/bytes_per_step"] == DENSE  # DeepSpeed's own reduction
    assert metrics["samples_per_s"] > 0


def test_horovod_runs_lm_with_mfac_and_powersgd_and_restarts_exactly(local_ray, tmp_path):
    settings = ["trainer.engine=horovod", *MFAC, "comm.hook=powersgd", "comm.rank=2",
                "comm.start_iter=2"]  # fmt: skip
    reference = _run(tmp_path, "ref", *settings)
    assert _check_trained(reference, "horovod", 0.6 * DENSE)["mfac/skipped_steps"] == 0
    fault = _run(tmp_path, "fault", *settings, *FAULT)
    assert [r["step"] for r in _records(fault)].count(5) == 2
    _same_weights(fault, reference)


def test_vision_recipe_gives_the_same_model_under_every_engine(local_ray, tmp_path):
    """The same QSGD math over three transports: DDP's hook, DeepSpeed, Horovod."""
    results = {
        engine: run(
            "vision",
            [
                "run.steps=12",
                "run.eval_every=12",
                f"run.output_dir={tmp_path}",
                f"run.name={engine}",
                "model.width=8",
                "comm.hook=qsgd",
                "comm.start_iter=2",
                f"trainer.engine={engine}",
            ],
            show_progress=False,
        )  # fmt: skip
        for engine in ("ddp", "deepspeed", "horovod")
    }
    for result in results.values():
        metrics = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
        assert metrics["comm/bytes_per_step"] < 0.5 * metrics["comm/dense_bytes_per_step"]
        assert metrics["ranks/weight_spread"] == 0.0
        _same_weights(result, results["ddp"], atol=1e-5)
