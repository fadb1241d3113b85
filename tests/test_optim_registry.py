"""Optimizers by name from a config: sgd, adamw, mfac; settings checked; schedules apply."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gradlane import OPTIMIZERS, ConfigError, build_optimizer, build_scheduler
from gradlane.optimizers import MFAC


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(3))]


def test_registry_names_the_three_optimizers():
    assert {"sgd", "adamw", "mfac"} <= set(OPTIMIZERS.names())
    assert "M-FAC" in OPTIMIZERS.entry("mfac").summary()


def test_mfac_from_a_recipe_style_config():
    cfg = OmegaConf.create(
        {
            "name": "mfac",
            "lr": 0.01,
            "ngrads": 512,
            "damp": 1e-5,
            "momentum": 0.9,
            "window_dtype": "bfloat16",
            "schedule": "cosine",
            "warmup_steps": 5,
        }
    )
    opt = build_optimizer(cfg, _params())
    assert isinstance(opt, MFAC)
    assert (opt.ngrads, opt.damp, opt.window_dtype) == (512, 1e-5, torch.bfloat16)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["momentum"] == 0.9
    assert opt.shard_window is False


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_sgd_and_adamw_still_build(name, kind):
    assert isinstance(build_optimizer({"name": name, "lr": 0.1}, _params()), kind)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"ngrads": 0}, "optimizer.ngrads=0 must be an int >= 1"),
        ({"damp": 0.0}, "optimizer.damp=0.0 must be > 0"),
        ({"damp": -1}, "optimizer.damp=-1.0 must be > 0"),
        ({"lr": -0.5}, "optimizer.lr=-0.5 must be >= 0"),
        ({"window_dtype": "int8"}, "optimizer.window_dtype='int8' is not one of"),
        ({"ngrads": "many"}, "optimizer.ngrads='many' has the wrong type"),
        ({"ngrad": 16}, "did you mean 'ngrads'"),
    ],
)
def test_bad_mfac_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError) as info:
        build_optimizer({"name": "mfac", **settings}, _params())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_schedule_drives_the_mfac_learning_rate():
    params = _params()
    cfg = {"name": "mfac", "lr": 0.2, "ngrads": 4, "schedule": "linear", "warmup_steps": 4}
    opt = build_optimizer(cfg, params)
    sched = build_scheduler(cfg, opt, total_steps=10)
    seen = []
    for _ in range(5):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.15, 0.2, 0.2, 0.2 * 5 / 6])
