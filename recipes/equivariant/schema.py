"""The equivariant recipe's `model.*` and `data.*` settings, typed and bounded."""

from __future__ import annotations

from dataclasses import dataclass

from gradlane.errors import ConfigError
from gradlane.layers.gaunt import BACKENDS
from gradlane.recipe import param

from .model import BACKBONES


@dataclass
class EquivariantModel:
    backbone: str = param("gaunt", choices=BACKBONES)  # e3nn: the same net with CG products
    channels: int = param(32, ge=1)  # C channels per degree
    lmax: int = param(2, ge=0, le=8)  # highest SH degree of node and edge features
    layers: int = param(2, ge=1)  # message-passing layers
    correlation: int = param(2, ge=1, le=4)  # body order of the many-body product (1: none)
    cutoff: float = param(4.5, gt=0.0)  # neighbour cutoff, Angstrom
    radial: int = param(8, ge=1)  # Bessel radial basis functions
    radial_hidden: int = param(32, ge=1)  # hidden width of the radial MLP
    readout_hidden: int = param(32, ge=1)  # hidden width of the energy readout
    tp_backend: str = param("auto", choices=BACKENDS)  # Gaunt product route (gaunt backbone)
    energy_weight: float = param(0.1, ge=0.0)  # loss: w_E ((E - E_ref) / atoms / scale)^2
    force_weight: float = param(1.0, ge=0.0)  # loss: w_F mean((F - F_ref) / scale)^2

    def check(self) -> None:
        if self.energy_weight == 0 and self.force_weight == 0:
            raise ConfigError("model.energy_weight and model.force_weight are both 0: no loss")


@dataclass
class EquivariantData:
    supercell: list[int] = param([1, 2, 3], ge=1)  # conventional fcc cells along x, y, z
    lattice: float = param(3.61, gt=0.0)  # Angstrom (Cu)
    au_fraction: float = param(0.0, ge=0.0, le=1.0)  # fraction of sites that are Au
    strain: float = param(0.02, ge=0.0, lt=0.2)  # random orthorhombic strain per trajectory
    train_temperatures: list[float] = param([300.0, 500.0, 700.0], gt=0.0)  # Kelvin
    test_temperature: float = param(900.0, gt=0.0)  # the held-out temperature
    trajectories: int = param(2, ge=1)  # Langevin runs per temperature
    equilibrate: int = param(100, ge=0)  # MD steps before the first sample
    frames: int = param(50, ge=1)  # samples per trajectory
    sample_every: int = param(10, ge=1)  # MD steps between samples
    timestep_fs: float = param(5.0, gt=0.0)
    friction_per_fs: float = param(0.02, ge=0.0)
    seed: int = param(0, ge=0)  # the data's own seed (independent of run.seed)
    cache_dir: str = param("")  # generated data cache; "" = ~/.cache/gradlane/md
    batch_size: int = param(4, ge=1)  # structures per worker per step
    eval_train: int = param(64, ge=0)  # training structures scored at evaluation (0: none)

    def check(self) -> None:
        if len(self.supercell) != 3:
            raise ConfigError(f"data.supercell={list(self.supercell)} must have 3 entries")
        if not self.train_temperatures:
            raise ConfigError("data.train_temperatures is empty: give at least one temperature")
