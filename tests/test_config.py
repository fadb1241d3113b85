"""Config merge order, and every bad-input case: exit code 2, one line, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gradlane.config import compose
from gradlane.errors import ConfigError
from gradlane.recipes import RECIPES

LM_YAML = RECIPES.get("lm").config


def test_merge_order_defaults_recipe_file_cli(tmp_path: Path):
    file = tmp_path / "extra.yaml"
    file.write_text("run:\n  steps: 7\n  seed: 3\nmodel:\n  d_model: 64\n")
    cfg = compose("lm", file, ["run.steps=11"])
    assert cfg.run.steps == 11  # CLI beats file
    assert cfg.run.seed == 3  # file beats default 0
    assert cfg.model.d_model == 64  # file beats the schema's 128
    assert cfg.optimizer.lr == OmegaConf.load(LM_YAML).optimizer.lr  # recipe beats default
    assert cfg.trainer.max_failures == 0  # structured default


def test_switching_optimizer_drops_the_previous_ones_parameters():
    cfg = compose("lm", None, ["optimizer.name=sgd"])
    assert cfg.optimizer.name == "sgd"
    assert "weight_decay" not in cfg.optimizer or cfg.optimizer.weight_decay == 0.0
    assert cfg.optimizer.schedule == "cosine"  # schedule keys survive


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.num_worker=2", "unknown key 'trainer.num_worker'"),
        ("trainer.num_worker=2", "did you mean 'trainer.num_workers'"),
        ("model.d_modle=3", "did you mean 'model.d_model'"),
        ("foo=1", "unknown key 'foo'"),
        ("run.steps=abc", "run.steps='abc' has the wrong type: expected int"),
        ("run.steps=-5", "run.steps=-5 must be >= 1"),
        ("trainer.num_workers=0", "trainer.num_workers=0 must be >= 1"),
        ("comm.hook=powersdg", "unknown comm hook 'powersdg' (did you mean 'powersgd'?)"),
        ("optimizer.name=adamm", "unknown optimizer 'adamm' (did you mean 'adamw'?)"),
        ("optimizer.lr=-1", "optimizer.lr=-1"),
        ("optimizer.betas=1", "unknown key 'optimizer.betas'"),
        ("optimizer.schedule=cosin", "optimizer.schedule='cosin' is not allowed"),
        ("comm.rank=4", "unknown key 'comm.rank'"),
        ("optimizer.name=mfac optimizer.ngrads=0", "optimizer.ngrads=0 must be"),
        ("optimizer.name=mfac optimizer.damp=0", "optimizer.damp=0"),
        ("comm.hook=powersgd comm.rank=0", "comm.rank=0 must be"),
        ("comm.hook=lgreco comm.alpha=-1", "comm.alpha=-1.0 must be > 0"),
        ("comm.hook=topk comm.density=1.5", "comm.density=1.5"),
        ("optimizer.warmup_steps=abc", "optimizer.warmup_steps='abc' must be an integer >= 0"),
        ("optimizer.min_lr_ratio=2", "optimizer.min_lr_ratio=2 must be a number in [0, 1]"),
        ("ray.num_cpus=0", "ray.num_cpus=0 must be >= 1"),
    ],
)
def test_bad_input_is_one_line_naming_key_and_value(override, expected):
    with pytest.raises(ConfigError) as err:
        compose("lm", None, override.split())
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def _assert_rejected(proc, expected: str, cwd: Path):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "lm", "trainer.num_workrs=2"], "did you mean 'trainer.num_workers'"),
        (["run", "lm", "run.steps=-1"], "run.steps=-1 must be >= 1"),
        (["run", "lm", "run.steps=x"], "run.steps='x' has the wrong type"),
        (["run", "lmx"], "unknown recipe 'lmx' (did you mean 'lm'?)"),
        (["run", "lm", "comm.hook=nope"], "unknown comm hook 'nope'"),
        (["run", "lm", "optimizer.name=nope"], "unknown optimizer 'nope'"),
        (["run", "lm", "-c", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["run", "lm", "oops"], "override 'oops' is not of the form key=value"),
        (["run", "vision", "model.norm=groupnorm"], "model.norm='groupnorm' is not allowed"),
        (["run", "lm", "model.d_model=30"], "model.d_model=30 must be divisible by model.n_head"),
        (["run", "lm", "data.batch_size=0"], "data.batch_size=0 must be >= 1"),
        (["run", "lm", "data.eval_batches=0"], "data.eval_batches=0 must be >= 1"),
        (["run", "lm", "model.n_head=0"], "model.n_head=0 must be >= 1"),
        (["run", "lm", "model.dropout=2"], "model.dropout=2.0 must be in [0, 1)"),
        (["run", "lm", "data.max_bytes=10"], "cannot hold one window of model.context + 1"),
        (["run", "vision", "model.label_smoothing=1.5"], "model.label_smoothing=1.5 must be"),
        (["run", "lm", "resume=nowhere"], "resume='nowhere' is neither a gradlane run"),
        (
            ["run", "lm", "trainer.num_workers=64", "ray.num_cpus=2"],
            "trainer.num_workers=64 x 1 CPU per worker needs 64 CPU but the Ray cluster has 2",
        ),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(gradlane_cli, tmp_path: Path, args, expected):
    proc = gradlane_cli(*args, "run.output_dir=out", cwd=tmp_path)
    _assert_rejected(proc, expected, tmp_path)


def test_resume_is_only_taken_from_the_command_line(gradlane_cli, tmp_path: Path):
    (tmp_path / "extra.yaml").write_text("resume: /nowhere\n")
    proc = gradlane_cli("run", "lm", "-c", "extra.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "resume in config file 'extra.yaml': give it on the command line" in proc.stderr


def test_unreachable_tracking_server_fails_before_training(gradlane_cli, tmp_path: Path):
    proc = gradlane_cli(
        "run", "lm", "run.output_dir=out", "tracking.uri=http://127.0.0.1:9", "ray.num_cpus=2",
        cwd=tmp_path,
    )  # fmt: skip
    _assert_rejected(proc, "tracking.uri='http://127.0.0.1:9' is unreachable", tmp_path)


def test_show_prints_the_resolved_config(gradlane_cli):
    proc = gradlane_cli("show", "lm", "run.steps=9", "comm.hook=powersgd", "comm.rank=2")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.run.steps == 9 and cfg.run.recipe == "lm"
    assert cfg.comm == {"hook": "powersgd", "rank": 2}


def test_list_names_recipes_hooks_and_optimizers(gradlane_cli):
    proc = gradlane_cli("list")
    assert proc.returncode == 0, proc.stderr
    for name in ("lm", "none", "powersgd", "fp16", "adamw", "sgd"):
        assert f"  {name} " in proc.stdout
