"""The vision recipe in-process: batches, training with every norm, the MIP hypernetwork
serving every label-smoothing setting, config errors, artifacts; and 2 real gloo DDP ranks
with every registered comm hook and optimizer."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from mp_utils import run_ranks

from gradlane.comm import COMM_HOOKS, register_comm_hook
from gradlane.config import compose
from gradlane.errors import ConfigError
from gradlane.evaluation import evaluate
from gradlane.layers import EvoNormB0, EvoNormS0, Hypernetized
from gradlane.optim import OPTIMIZERS, build_optimizer
from gradlane.recipe import WorkerContext
from gradlane.recipes import RECIPES
from gradlane.recipes.vision.model import ResNet, build_resnet

RECIPE = RECIPES.get("vision")
TINY = ["model.width=4", "data.image_size=8", "data.batch_size=32"]
CPU = torch.device("cpu")


def config(*overrides: str):
    return compose("vision", overrides=[*TINY, *overrides])


def build(*overrides: str, rank: int = 0, world: int = 1):
    cfg = config(*overrides)
    torch.manual_seed(cfg.run.seed)  # as the training loop does: the same weights on every rank
    return cfg, RECIPE.build(cfg, WorkerContext(rank, world, CPU, cfg.run.seed))


def train(cfg, task, steps: int) -> list[float]:
    opt = build_optimizer(cfg.optimizer, task.model.parameters())
    losses = []
    for step in range(steps):
        loss = task.loss(task.model, task.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_batches_depend_only_on_seed_step_and_rank():
    _, a = build()
    _, b = build()
    _, other_rank = build(rank=1, world=2)
    _, other_seed = build("run.seed=1")
    x, y = a.batch(3)
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert torch.equal(x, b.batch(3)[0]) and torch.equal(y, b.batch(3)[1])
    assert not torch.equal(x, a.batch(4)[0])
    assert not torch.equal(x, other_rank.batch(3)[0])
    assert not torch.equal(x, other_seed.batch(3)[0])
    _, hyper = build("model.hyper=mip")
    s = hyper.batch(3)[2]
    assert 0.0 <= s <= 1.0 and s == hyper.batch(3)[2] and s != hyper.batch(4)[2]


@pytest.mark.parametrize("norm", ["batchnorm", "syncbatchnorm", "evonorm_b0", "evonorm_s0"])
def test_every_norm_trains(norm):
    cfg, task = build(f"model.norm={norm}", "optimizer.lr=0.01")
    losses = train(cfg, task, 40)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    scores = evaluate(task, task.model, CPU)
    assert set(scores) == {"acc", "nll", "conf"}
    assert scores["acc"] > 0.5  # 10 classes: chance is 0.1


def test_our_resnet_converts_completely_in_place():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convert_norms would warn about any layer it left
        model = build_resnet("evonorm_s0", width=4)
    assert type(model) is ResNet
    norms = [m for m in model.modules() if isinstance(m, EvoNormS0)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert [m.apply_act for m in norms].count(True) == 4  # stem + norm1 of 3 blocks
    assert len(norms) == 9  # + norm2 of 3 blocks + 2 projected shortcuts
    assert isinstance(build_resnet("evonorm_b0").layer1[0].norm1, EvoNormB0)


def test_mip_hypernetwork_serves_every_label_smoothing_setting():
    cfg, task = build("model.hyper=mip", "model.hyper_params=[layer3.*,fc.*]", "optimizer.lr=0.003")
    assert isinstance(task.model, Hypernetized)
    assert set(task.model.hypernet.outputs) >= {"fc.weight", "layer3.0.conv1.weight"}
    train(cfg, task, 80)
    scores = evaluate(task, task.model, CPU)
    assert set(scores) == {f"{k}_at_{s}" for k in ("acc", "nll", "conf") for s in ("0", "0.5", "1")}
    assert scores["acc_at_0"] > 0.7 and scores["acc_at_1"] > 0.7
    # more label smoothing -> less confident predictions, from the one trained model
    assert scores["conf_at_0"] > scores["conf_at_0.5"] > scores["conf_at_1"]


def test_artifacts(tmp_path):
    for hyper, rows in (("none", 1), ("mip", 11)):
        _, task = build(f"model.hyper={hyper}")
        out = tmp_path / hyper
        out.mkdir()
        task.save_artifacts(task.model, out)
        data = json.loads((out / "vision_eval.json").read_text())
        assert len(data) == rows and {"acc", "nll", "conf"} <= set(data[0])
        assert (out / "vision_eval.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["model.norm=layernorm"], 1, "model.norm='layernorm' is not allowed.*allowed: batchnorm"),
        (["model.hyper=lora"], 1, "model.hyper='lora' is not allowed"),
        (["model.norm=syncbatchnorm"], 2, "syncbatchnorm' needs GPU workers"),
        (["model.hyper=mip", "model.hyper_params=[head.*]"], 1, "which='head.*' matches no"),
        (["model.hyper=mip", "model.eval_settings=[0.5,2.0]"], 1, r"eval_settings=\[0.5, 2.0\]"),
        (["model.width=0"], 1, "model.width=0"),
        (["data.image_size=4"], 1, "data.image_size=4 must be >= 8"),
        (["data.batch_size=0"], 1, "data.batch_size=0 must be >= 1"),
    ],
)
def test_config_errors_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        build(*overrides, world=world)


# ---- 2 DDP ranks ----------------------------------------------------------------------------


def _fast(factory, **wanted) -> dict:
    """The wanted keyword values that `factory` accepts (compress from the first steps)."""
    accepted = inspect.signature(factory).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def _ddp_runs(rank: int, world: int, combos: list) -> list:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = []
    for hook, optimizer, overrides in combos:
        cfg, task = build(*overrides, f"optimizer.name={optimizer}", rank=rank, world=world)
        ddp = DDP(task.model)
        comm = {
            "hook": hook,
            **_fast(COMM_HOOKS.get(hook), start_iter=2, adjust_every=2, accumulate=1),
        }
        register_comm_hook(ddp, comm)
        settings = {"name": optimizer, **_fast(OPTIMIZERS.get(optimizer), ngrads=4)}
        opt = build_optimizer(settings, task.model.parameters())
        before = torch.cat([p.detach().flatten().clone() for p in task.model.parameters()])
        for step in range(4):
            loss = task.loss(ddp, task.batch(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = torch.cat([p.detach().flatten() for p in task.model.parameters()])
        results.append((loss.item(), before, after))
    return results


def test_ddp_two_gloo_ranks_with_every_hook_and_optimizer():
    hooks, optimizers = COMM_HOOKS.names(), OPTIMIZERS.names()
    models = [
        ["model.norm=evonorm_s0", "model.hyper=mip"],
        ["model.norm=evonorm_b0"],
        ["model.norm=batchnorm", "model.hyper=mip"],
    ]
    n = max(len(hooks), len(optimizers))
    combos = [
        (hooks[i % len(hooks)], optimizers[i % len(optimizers)], models[i % len(models)])
        for i in range(n)
    ]
    per_rank = run_ranks(_ddp_runs, 2, combos, timeout_s=300)
    for (hook, opt, model), r0, r1 in zip(combos, *per_rank, strict=True):
        label = f"{hook}/{opt}/{model}"
        assert torch.isfinite(torch.tensor([r0[0], r1[0]])).all(), label
        assert not torch.equal(r0[1], r0[2]), label  # it trained
        torch.testing.assert_close(r0[2], r1[2], rtol=0, atol=1e-6, msg=label)  # ranks agree
