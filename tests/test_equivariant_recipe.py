"""The equivariant recipe: EMT data, exact periodic forces, invariance of every backbone,
compressible parameters, config errors, and one short run through Ray with 2 workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e3nn import o3

import gradlane.recipes.equivariant.data as md
from gradlane.compressors import PowerSGD
from gradlane.config import compose
from gradlane.errors import ConfigError
from gradlane.evaluation import evaluate
from gradlane.recipe import WorkerContext
from gradlane.recipes import RECIPES
from gradlane.recipes.equivariant.data import MDSettings, collate, load

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
F64 = torch.float64
TINY_DATA = ["data.trajectories=1", "data.frames=4", "data.equilibrate=10",
             "data.sample_every=5", "data.train_temperatures=[300,600]", "data.eval_train=4",
             "data.batch_size=2"]  # fmt: skip
DEFAULT_WIDTH = ["model.channels=32", "model.radial_hidden=32", "model.readout_hidden=32"]
TINY_MODEL = ["model.channels=8", "model.radial_hidden=16", "model.readout_hidden=16",
              "model.layers=2", "model.lmax=2"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("md-cache")


def build(cache, *overrides, rank=0, world=1):
    cfg = compose("equivariant", overrides=[*TINY_DATA, *TINY_MODEL, f"data.cache_dir={cache}",
                                            *overrides])  # fmt: skip
    torch.manual_seed(cfg.run.seed)
    return RECIPES.get("equivariant").build(cfg, WorkerContext(rank, world, CPU, cfg.run.seed))


def test_md_data_is_deterministic_cached_and_keyed_by_settings(cache, monkeypatch):
    cfg = compose("equivariant", overrides=TINY_DATA)
    settings = MDSettings.of(cfg.data)
    first = load(settings, cache)
    monkeypatch.setattr(md, "generate", lambda s: pytest.fail("regenerated a cached data set"))
    again = load(settings, cache)
    for split in ("train", "test"):
        for key, value in first[split].items():
            assert np.array_equal(value, again[split][key]), key
    assert first["train"]["positions"].shape == (2 * 4, 24, 3)  # 2 temperatures x 4 frames
    assert set(first["test"]["temperature"]) == {900.0}
    monkeypatch.undo()
    other = load(MDSettings.of(compose("equivariant", overrides=[*TINY_DATA, "data.seed=1"]).data),
                 cache)  # fmt: skip
    assert not np.allclose(other["train"]["positions"], first["train"]["positions"])
    assert len(list(cache.glob("*.npz"))) == 2


def test_emt_forces_are_minus_the_energy_gradient(cache):
    """The generated labels themselves: EMT forces against a finite difference of EMT energy."""
    from ase import Atoms
    from ase.calculators.emt import EMT

    data = load(MDSettings.of(compose("equivariant", overrides=TINY_DATA).data), cache)["test"]
    atoms = Atoms(numbers=data["numbers"][0], positions=data["positions"][0],
                  cell=data["cells"][0], pbc=True, calculator=EMT())  # fmt: skip
    h, atom = 1e-4, 5
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.calc = EMT()
        moved.positions[atom, 1] += sign * h
        energies.append(moved.get_potential_energy())
    expected = -data["forces"][0][atom, 1]
    assert (energies[0] - energies[1]) / (2 * h) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("backbone", ["gaunt", "e3nn", "frame_averaging"])
def test_model_forces_are_exact_gradients_through_periodic_images(cache, backbone):
    """-dE/dx by autograd against central differences, in float64, with a 3.6 A cell axis:
    atoms see their own periodic images within the cutoff."""
    task = build(cache, f"model.backbone={backbone}")
    model = task.model.double()
    batch = collate(task.train, [0, 1]).to(CPU, F64)
    _, forces = model(batch, create_graph=False)
    h = 1e-5
    for atom, axis in ((0, 0), (17, 2), (30, 1)):
        energies = []
        for sign in (1, -1):
            moved = batch.positions.clone()
            moved[atom, axis] += sign * h
            moved_batch = md.GraphBatch(**{**vars(batch), "positions": moved})
            energies.append(model.potential(moved_batch).sum())
        fd = -(energies[0] - energies[1]) / (2 * h)
        assert fd.item() == pytest.approx(forces[atom, axis].item(), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("backbone", ["gaunt", "e3nn", "frame_averaging"])
def test_energy_invariant_and_forces_equivariant(cache, backbone):
    task = build(cache, f"model.backbone={backbone}")
    model = task.model.double()
    batch = collate(task.train, [2, 3]).to(CPU, F64)
    energy, forces = model(batch, create_graph=False)
    torch.manual_seed(0)
    for reflect in (1, -1):
        rotation = o3.rand_matrix(dtype=F64) * reflect
        shift = torch.randn(3, dtype=F64)
        moved = md.GraphBatch(**{**vars(batch), "positions": batch.positions @ rotation.T + shift,
                                 "cells": batch.cells @ rotation.T})  # fmt: skip
        e2, f2 = model(moved, create_graph=False)
        assert (e2 - energy).abs().max() < 1e-9
        assert (f2 - forces @ rotation.T).abs().max() < 1e-9


@pytest.mark.parametrize("backbone", ["gaunt", "e3nn"])
def test_large_tensors_are_matrices_every_hook_compresses(cache, backbone):
    """PowerSGD sends 1-D tensors as they are; at the default width every parameter of
    1000+ entries is a matrix whose rank-8 factors save at least 2x, so PowerSGD with
    comm.rank <= 8 (and TopK / QSGD / casts, which compress any shape) compress the
    bulk of the model."""
    task = build(cache, f"model.backbone={backbone}", *DEFAULT_WIDTH)
    compressor = PowerSGD(8)
    total = sum(p.numel() for p in task.model.parameters())
    large = {n: p for n, p in task.model.named_parameters() if p.numel() >= 1000}
    assert sum(p.numel() for p in large.values()) > 0.85 * total
    for name, p in large.items():
        assert compressor.compresses(p.shape, 8), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.backbone=mace", "model.backbone='mace' is not allowed"),
        ("model.lmax=9", "model.lmax=9 must be in [0, 8]"),
        ("model.tp_backend=cuda", "model.tp_backend='cuda' is not allowed"),
        ("data.supercell=[1,2]", "data.supercell=[1, 2] must have 3 entries"),
        ("data.train_temperatures=[]", "data.train_temperatures is empty"),
        ("model.energy_weight=0", "model.energy_weight and model.force_weight are both 0"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message):
    overrides = [override, "model.force_weight=0"] if "weight" in override else [override]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compose("equivariant", overrides=overrides)


def test_gaunt_backbone_learns_and_evaluates_with_grad(cache, tmp_path):
    task = build(cache, "model.backbone=gaunt", "data.batch_size=4")
    before = evaluate(task, task.model, CPU)
    opt = torch.optim.Adam(task.model.parameters(), 5e-3)
    for step in range(40):
        loss = task.loss(task.model, task.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate(task, task.model, CPU)
    assert after["train_force_mae_meV_A"] < 0.8 * before["train_force_mae_meV_A"]
    assert after["test_force_mae_over_std"] == pytest.approx(
        after["test_force_mae_meV_A"] / after["test_force_std_meV_A"]
    )
    task.save_artifacts(task.model, tmp_path)
    summary = json.loads((tmp_path / "equivariant_eval.json").read_text())
    assert summary["test_force_mae_meV_A"] == pytest.approx(after["test_force_mae_meV_A"], rel=1e-4)
    assert (tmp_path / "equivariant_parity.png").stat().st_size > 5000


def test_batches_depend_only_on_seed_step_and_rank(cache):
    a, b = build(cache), build(cache)
    other = build(cache, rank=1, world=2)
    assert torch.equal(a.batch(3).positions, b.batch(3).positions)
    assert not torch.equal(a.batch(3).positions, a.batch(4).positions)
    assert not torch.equal(a.batch(5).positions, other.batch(5).positions)


@pytest.mark.slow
def test_gradlane_run_two_workers_through_ray_with_powersgd(gradlane_cli, cache, tmp_path):
    """`gradlane run equivariant ...`: an embedded Ray with 2 Train workers, PowerSGD,
    validation metrics and the parity plot in the local MLflow store."""
    from mlflow.tracking import MlflowClient

    proc = gradlane_cli(
        "run", "equivariant", *TINY_DATA, *TINY_MODEL, f"data.cache_dir={cache}",
        *DEFAULT_WIDTH, "run.output_dir=out", "run.steps=6", "run.eval_every=6",
        "run.log_every=2", "trainer.num_workers=2", "comm.hook=powersgd", "comm.rank=8",
        "comm.start_iter=2", "ray.num_cpus=2", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (info,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/run.json")]
    assert info["status"] == "FINISHED"
    client = MlflowClient(info["tracking_uri"])
    metrics = client.get_run(info["run_id"]).data.metrics
    for key in ("test_energy_mae_meV_atom", "test_force_mae_meV_A", "train_force_mae_meV_A",
                "test_force_mae_over_std"):  # fmt: skip
        assert np.isfinite(metrics[f"val/{key}"]), key
    assert metrics["comm/bytes_per_step"] < 0.5 * metrics["comm/dense_bytes_per_step"]
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"equivariant_parity.png", "equivariant_eval.json"} <= artifacts
