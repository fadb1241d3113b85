"""The newer recipes under DeepSpeed and Horovod through the Ray launcher (2 workers,
gloo): the run finishes, every rank holds the same model, validation is finite, and the
fp16 hook's bytes (half of the dense gradient) go through the engine's transport."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient
from test_e2e_nerf import TINY_NERF
from test_equivariant_recipe import TINY_DATA, TINY_MODEL

from gradlane.errors import ConfigError
from gradlane.launcher import prepare, run

pytestmark = pytest.mark.slow

CASES = {
    "equivariant": (
        [*TINY_DATA, *TINY_MODEL, "run.steps=6", "run.eval_every=6"],
        "val/test_force_mae_meV_A",
    ),
    "nerf_distill": ([*TINY_NERF, "run.steps=6", "run.eval_every=6"], "val/psnr"),
}


@pytest.mark.parametrize(
    ("recipe", "engine"),
    [("equivariant", "horovod"), ("nerf_distill", "deepspeed"), ("nerf_distill", "horovod")],
)
def test_recipe_trains_under_the_engine(local_ray, tmp_path_factory, recipe, engine):
    overrides, metric = CASES[recipe]
    cache = tmp_path_factory.getbasetemp() / f"cache-{recipe}"  # shared by both engines
    result = run(
        recipe,
        [*overrides, f"trainer.engine={engine}", "comm.hook=fp16", "comm.start_iter=0",
         f"data.cache_dir={cache}", f"run.output_dir={tmp_path_factory.mktemp(engine)}"],
        show_progress=False,
    )  # fmt: skip
    mlrun = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["trainer.engine"] == engine
    metrics = mlrun.data.metrics
    assert metrics["ranks/weight_spread"] == 0.0
    assert math.isfinite(metrics[metric])
    ratio = metrics["comm/bytes_per_step"] / metrics["comm/dense_bytes_per_step"]
    assert 0.45 < ratio < 0.55, ratio


def test_equivariant_forces_are_refused_under_deepspeed(tmp_path):
    """Its loss differentiates the energy inside the loss, which DeepSpeed's engine
    refuses mid-run: said before launch instead (one line, exit 2 from the CLI)."""
    overrides, _ = CASES["equivariant"]
    message = "trainer.engine=deepspeed cannot train the equivariant recipe"
    with pytest.raises(ConfigError, match=message) as info:
        prepare("equivariant", None, [*overrides, "trainer.engine=deepspeed",
                                      f"data.cache_dir={tmp_path}"])  # fmt: skip
    assert "\n" not in str(info.value)
