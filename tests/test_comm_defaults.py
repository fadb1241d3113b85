"""A hook that compresses nothing says so, and each recipe's hook defaults compress its
model (issue 12, item 5). No process group: the states are built, not run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gradlane.comm import build_comm_state, warn_if_little_compressed
from gradlane.config import compose
from gradlane.launcher import RunResult, summary_table
from gradlane.recipe import WorkerContext
from gradlane.recipes import RECIPES

HOOKS = ("powersgd", "topk", "qsgd", "fp16", "bf16", "lgreco")
MODELS = {
    "lm": ["data.max_bytes=50000"],
    "vision": [],
    "vision-evonorm-mip": ["model.norm=evonorm_s0", "model.hyper=mip"],
}


def _model(recipe: str, overrides: list[str]) -> tuple[torch.nn.Module, dict]:
    cfg = compose(recipe.split("-")[0], None, overrides)
    task = RECIPES.get(cfg.run.recipe).build(cfg, WorkerContext(0, 1, torch.device("cpu"), 0))
    return task.model, dict(cfg.comm)


@pytest.mark.parametrize("recipe", MODELS)
def test_every_hook_compresses_most_of_each_recipes_model_with_its_defaults(recipe):
    for hook in HOOKS:
        model, comm = _model(recipe, [*MODELS[recipe], f"comm.hook={hook}"])
        name, state, _ = build_comm_state(model, comm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert warn_if_little_compressed(name, state) is None, (recipe, hook)
        assert state.compressed_share() >= 0.9, (recipe, hook, state.uncompressed())


def test_a_hook_that_compresses_little_warns_naming_the_layers_and_why():
    model, _ = _model("vision", MODELS["vision-evonorm-mip"])
    _, state, _ = build_comm_state(model, {"hook": "powersgd", "rank": 16})
    with pytest.warns(UserWarning, match=r"comm.hook='powersgd' compresses 0% of the gradient"):
        text = warn_if_little_compressed("powersgd", state)
    assert "hypernet.out.weight: 58442x16 at rank 16 saves less than min_compression_rate=2" in text
    assert "hypernet.theta0: 1-D" in text
    result = RunResult(Path("r"), "id", "uri", None, {"comm/compressed_share": 0.0})
    assert "the hook compressed only 0% of the gradient" in summary_table(result)

    half = torch.nn.Linear(8, 8).half()
    _, state, _ = build_comm_state(half, {"hook": "fp16"})
    with pytest.warns(UserWarning, match="torch.float16 gradients are already 16-bit"):
        warn_if_little_compressed("fp16", state)
