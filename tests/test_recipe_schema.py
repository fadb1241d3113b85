"""Typed recipe sections, one-line errors for every bad input, sharded evaluation, per-rank seeds.

Bad values are generated from each registered recipe's own schema (a wrong type
and a value past each bound for every field), so a new recipe is covered as
soon as it is registered; each must stop `gradlane run` with exit 2 and one
line naming `section.key=value`, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mp_utils import run_ranks

from gradlane.cli import main
from gradlane.config import compose
from gradlane.errors import ConfigError
from gradlane.evaluation import evaluate
from gradlane.recipe import Task, WorkerContext, param
from gradlane.recipes import RECIPES
from gradlane.schema import check_section

CPU = torch.device("cpu")


def _bad_values(recipe: str) -> list[tuple[str, str]]:
    """(override, text the error must hold) for every field of the recipe's schema."""
    entry = RECIPES.get(recipe)
    out = []
    for section, cls in (("model", entry.model), ("data", entry.data)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, hint = f"{section}.{f.name}", hints[f.name]
            wrong = {int: "2.5", float: "abc", str: "[1]", bool: "maybe"}.get(hint, "0.5")
            out.append((f"{key}={wrong}", f"{key}="))
            meta = f.metadata
            for bound, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                if bound in meta:
                    value = meta[bound] + step
                    if typing.get_origin(hint) is list:
                        out.append((f"{key}=[{value}]", f"{key}=[{value}"))
                    else:
                        out.append((f"{key}={value}", f"{key}={value}"))
            if "choices" in meta:
                out.append((f"{key}=nonesuch", f"{key}='nonesuch' is not allowed"))
    return out


CASES = [(r, o, e) for r in RECIPES.names() for o, e in _bad_values(r)]


@pytest.mark.parametrize(("recipe", "override", "expected"), CASES)
def test_every_schema_field_rejects_bad_values_before_anything_is_written(
    recipe, override, expected, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["run", recipe, override, "run.output_dir=out", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == []  # no run directory, no MLflow store


def test_schemas_cover_both_built_in_recipes():
    assert {r for r, _, _ in CASES} >= {"lm", "vision"}
    assert len(CASES) > 20


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run", "lm", "data.batch_size=2.5"],
            "data.batch_size=2.5 has the wrong type: expected int",
        ),
        (["run", "lm", "data.batch_size=abc"], "data.batch_size='abc' has the wrong type"),
        (["run", "vision", "model.width=2.5"], "model.width=2.5 has the wrong type"),
        (["run", "vision", "model.eval_settings=0.5"], "expected a list of float"),
        (["run", "vision", "model.eval_settings=[a]"], "model.eval_settings[0]='a'"),
        (["run", "lm", "model.d_model=30"], "model.d_model=30 must be divisible by model.n_head"),
        (["run", "lm", "--bogus"], "unrecognized arguments: --bogus"),
        (["run"], "the following arguments are required: recipe"),
        (["run", "lm", "run.output_dir=afile/below"], "afile is not a directory"),
        (["run", "lm", "run.output_dir=/proc/gradlane"], "run.output_dir='/proc/gradlane'"),
        (["run", "lm", "-c", "broken.yaml"], "'broken.yaml': not valid YAML: line 3:"),
        (["run", "lm", "-c", "list.yaml"], "must hold a mapping, not list"),
    ],
)
def test_issue_cases_exit_2_with_one_line(gradlane_cli, tmp_path: Path, args, expected):
    (tmp_path / "broken.yaml").write_text("run:\n  steps: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "afile").write_text("")
    before = set(tmp_path.iterdir())
    proc = gradlane_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert proc.stdout == ""  # not even the config is printed
    assert set(tmp_path.iterdir()) == before


# ---- the schema machinery ---------------------------------------------------------------


@dataclass
class Section:
    n: int = param(3, ge=1)
    p: float = param(0.5, gt=0.0, le=1.0)
    sizes: list[int] = param([4], ge=2)
    kind: str = param("a", choices=("a", "b"))
    limit: int | None = param(None, lt=10)

    def check(self) -> None:
        if self.n > self.sizes[0]:
            raise ConfigError(f"model.n={self.n} must be <= model.sizes[0]={self.sizes[0]}")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"n": 0}, "model.n=0 must be >= 1"),
        ({"p": 0.0}, "model.p=0.0 must be in (0, 1]"),
        ({"p": 1.5}, "model.p=1.5 must be in (0, 1]"),
        ({"sizes": [4, 1]}, "model.sizes=[4, 1]: every item must be >= 2"),
        ({"kind": "c"}, "model.kind='c' is not allowed; allowed: a, b"),
        ({"limit": 10}, "model.limit=10 must be < 10"),
        ({"n": 5}, "model.n=5 must be <= model.sizes[0]=4"),
    ],
)
def test_check_section_names_key_value_and_bound(values, expected):
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(Section), values)
    with pytest.raises(ConfigError) as err:
        check_section("model.", Section, node)
    assert str(err.value) == expected


def test_good_section_passes_and_a_dataclass_instance_is_the_default():
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(Section), {"limit": 9, "sizes": [3, 2]})
    check_section("model.", Section, node)  # no error
    a, b = Section(), Section()
    a.sizes.append(1)
    assert b.sizes == [4]  # list defaults are not shared between instances


def test_recipe_config_yaml_may_override_schema_defaults(tmp_path):
    cfg = compose("lm", overrides=["model.n_layer=2"])
    assert cfg.model.n_layer == 2 and cfg.model.d_model == 128  # schema default
    assert type(cfg.model.n_layer) is int


# ---- sharded evaluation: the whole set's numbers, each item once ---------------------------

LM = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.context=16",
      "data.max_bytes=100000", "data.batch_size=5", "data.eval_batches=3"]  # fmt: skip
VISION = ["model.width=4", "data.image_size=8", "model.hyper=mip"]


def _task(recipe: str, overrides: list[str], rank: int, world: int):
    cfg = compose(recipe, overrides=overrides)
    torch.manual_seed(0)
    return RECIPES.get(recipe).build(cfg, WorkerContext(rank, world, CPU, 0))


def _sharded(rank: int, world: int, recipe: str, overrides: list[str]):
    task = _task(recipe, overrides, rank, world)
    counts = {k: float(c) for k, (_, c) in task.evaluate(task.model).items()}
    return evaluate(task, task.model, CPU), counts


def _lm_oracle() -> dict[str, float]:
    """Mean next-byte loss over all 15 windows, computed directly."""
    from gradlane.recipes.lm.data import eval_batches

    task = _task("lm", LM, 0, 1)
    task.model.eval()
    with torch.no_grad():
        losses = [task.loss(task.model, b) for b in eval_batches(task.corpus.val, 5, 17, 3)]
    loss = float(torch.stack(losses).mean())  # equal batches: the mean of batch means
    return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def _vision_oracle() -> dict[str, float]:
    task = _task("vision", VISION, 0, 1)
    task.model.eval()
    out = {}
    with torch.no_grad():
        for s in (0.0, 0.5, 1.0):
            logits = task.model(task.data.val_x, hyper=s)
            y = task.data.val_y
            out[f"acc_at_{s:g}"] = float((logits.argmax(-1) == y).float().mean())
            out[f"nll_at_{s:g}"] = float(F.cross_entropy(logits, y))
    return out


@pytest.mark.parametrize(
    ("recipe", "overrides", "oracle"), [("lm", LM, _lm_oracle), ("vision", VISION, _vision_oracle)]
)
def test_sharded_evaluation_over_two_ranks_equals_the_whole_set(recipe, overrides, oracle):
    (m0, c0), (m1, c1) = run_ranks(_sharded, 2, recipe, overrides)
    assert m0 == m1  # every rank logs the same reduced numbers
    single, counts = _sharded(0, 1, recipe, overrides)
    name = next(iter(counts))
    assert c0[name] + c1[name] == counts[name] and c0[name] != c1[name]  # odd split, once each
    expected = oracle()
    for key, value in expected.items():
        assert m0[key] == pytest.approx(value, rel=1e-5), key
        assert single[key] == pytest.approx(value, rel=1e-5), key


class PSNRTask(Task):
    """A task whose metric is not a mean: PSNR of the whole set's MSE."""

    def __init__(self, errors: torch.Tensor, ctx: WorkerContext):
        self.errors, self.ctx = errors, ctx

    def evaluate(self, model):
        part = self.errors[self.ctx.shard(len(self.errors))]
        return {"mse": ((part**2).sum(), part.numel())}

    def finalize(self, means):
        return {**means, "psnr": -10 * math.log10(means["mse"])}


def _psnr(rank: int, world: int, errors: torch.Tensor):
    return evaluate(
        PSNRTask(errors, WorkerContext(rank, world, CPU, 0)), torch.nn.Linear(1, 1), CPU
    )


def test_finalize_sees_the_reduced_means():
    errors = torch.linspace(0.01, 0.3, 7, dtype=torch.float64)
    got = run_ranks(_psnr, 2, errors)[0]
    mse = float((errors**2).mean())
    assert got["mse"] == pytest.approx(mse) and got["psnr"] == pytest.approx(-10 * math.log10(mse))


@pytest.mark.parametrize(("n", "world"), [(7, 2), (5, 3), (2, 4), (16, 4)])
def test_shards_partition_the_items(n, world):
    parts = [list(range(n))[WorkerContext(r, world, CPU, 0).shard(n)] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---- per-rank seeds ---------------------------------------------------------------------------


def _dropout_masks(rank: int, world: int):
    ctx = WorkerContext(rank, world, CPU, seed=3)
    ctx.seed_globals()
    first = F.dropout(torch.ones(64), 0.5)
    ctx.seed_globals()
    return first, F.dropout(torch.ones(64), 0.5)


def test_dropout_masks_differ_across_ranks_and_repeat_per_rank():
    (a0, b0), (a1, b1) = [_dropout_masks(r, 2) for r in range(2)]
    assert torch.equal(a0, b0) and torch.equal(a1, b1)  # reproducible for a rank
    assert not torch.equal(a0, a1)  # different ranks draw different masks
