"""Registries: built-in lookups, typo errors, and third-party entry points from a
real (tiny) installed distribution found on the path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from mp_utils import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradlane
from gradlane.errors import ConfigError
from gradlane.registry import Registry

PLUGIN_SOURCE = '''
"""A third-party gradlane plugin."""
import torch


def counting_hook(model, process_group=None, scale: float = 1.0):
    """All-reduce that counts its calls (test plugin)."""
    state = {"calls": 0, "scale": scale}

    def hook(state, bucket):
        state["calls"] += 1
        tensor = bucket.buffer().mul_(state["scale"] / torch.distributed.get_world_size())
        fut = torch.distributed.all_reduce(tensor, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return state, hook


def plain_sgd(params, lr: float = 0.5):
    """Plain SGD (test plugin)."""
    return torch.optim.SGD(params, lr=lr)
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """`gl-dummy-plugin` installed as a distribution (dist-info + module) on sys.path."""
    (tmp_path / "gl_dummy_plugin.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "gl_dummy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gl-dummy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [gradlane.comm_hooks]
        counting = gl_dummy_plugin:counting_hook

        [gradlane.optimizers]
        plain = gl_dummy_plugin:plain_sgd
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    from gradlane.comm import COMM_HOOKS
    from gradlane.optim import OPTIMIZERS

    for registry in (COMM_HOOKS, OPTIMIZERS):  # forget the plugin for the following tests
        registry.refresh()


def test_builtin_lookup_and_typo_error():
    reg = gradlane.COMM_HOOKS
    assert {"none", "fp16", "powersgd"} <= set(reg.names())
    with pytest.raises(ConfigError, match=r"unknown comm hook 'powrsgd' \(did you mean 'powersgd'"):
        reg.get("powrsgd")


def test_entry_point_optimizer_is_found_and_built(installed_plugin):
    reg = Registry("optimizer", "gradlane.optimizers")
    assert "plain" in reg.names()
    assert reg.entry("plain").origin == "gl-dummy-plugin"
    # build_optimizer goes through the module-level registry: a fresh interpreter sees it
    from gradlane.optim import OPTIMIZERS

    OPTIMIZERS.refresh()  # re-scan: the distribution was installed after the first lookup
    opt = gradlane.build_optimizer({"name": "plain", "lr": 0.25}, [nn.Parameter(torch.ones(2))])
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ConfigError, match="unknown key 'optimizer.momentum' for optimizer 'plain'"):
        gradlane.build_optimizer({"name": "plain", "momentum": 0.9}, [nn.Parameter(torch.ones(2))])


def test_entry_point_comm_hook_runs_inside_ddp(installed_plugin):
    from gradlane.comm import COMM_HOOKS

    COMM_HOOKS.refresh()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = DDP(nn.Linear(3, 1))
        hook = gradlane.register_comm_hook(model, {"hook": "counting", "scale": 2.0})
        model(torch.ones(4, 3)).sum().backward()
        assert hook.state["calls"] == 1
        # the hook scaled the gradient by 2: d/dw sum(w.x + b) over 4 rows of ones = 4
        torch.testing.assert_close(model.module.weight.grad, torch.full((1, 3), 8.0))
    finally:
        dist.destroy_process_group()


def test_cli_lists_and_accepts_plugin_entries(installed_plugin, gradlane_cli):
    env = {"PYTHONPATH": os.pathsep.join([str(installed_plugin), *sys.path])}
    listing = gradlane_cli("list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "counting" in listing.stdout and "[gl-dummy-plugin]" in listing.stdout
    shown = gradlane_cli("show", "lm", "comm.hook=counting", "comm.scale=3", env=env)
    assert shown.returncode == 0, shown.stderr
    bad = gradlane_cli("show", "lm", "comm.hook=counting", "comm.scal=3", env=env)
    assert bad.returncode == 2 and "did you mean 'scale'" in bad.stderr


def test_package_imports_lazily():
    """`import gradlane` must not pull Ray or MLflow (they load on first use)."""
    code = "import sys, gradlane; print('ray' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_recipe_yaml_is_packaged():
    from gradlane.recipes import RECIPES

    assert Path(RECIPES.get("lm").config).is_file()
