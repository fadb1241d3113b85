"""Molecular-dynamics data generated on the machine: ASE's EMT potential, Langevin MD.

Periodic fcc Cu (optionally with a fraction of the sites Au) in a `supercell` of
conventional cubic cells, each trajectory with its own small random orthorhombic
strain (diverse, non-cubic cells). Langevin MD (ASE's `Langevin`) at each
temperature; after `equilibrate` steps every `sample_every`-th step is kept:
positions, cell, atomic numbers, EMT energy and forces. Training temperatures
and the held-out one are generated alike, from independent seeds. Everything is
a pure function of the settings, cached as `.npz` under `cache_dir`, keyed by a
hash of the settings (written atomically, under a file lock, so concurrent
workers generate it once).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

GENERATOR_VERSION = 1  # bump when the generation code changes what it writes


@dataclass(frozen=True)
class MDSettings:
    """What `generate` simulates (every field is part of the cache key; defaults and
    bounds live in the recipe's schema, `EquivariantData`)."""

    supercell: tuple[int, int, int]
    lattice: float  # Angstrom
    au_fraction: float
    strain: float  # each axis scaled by 1 + U(-strain, strain) per trajectory
    train_temperatures: tuple[float, ...]
    test_temperature: float
    trajectories: int  # per temperature
    equilibrate: int  # MD steps before sampling
    frames: int  # samples per trajectory
    sample_every: int
    timestep_fs: float
    friction_per_fs: float
    seed: int

    @classmethod
    def of(cls, data) -> MDSettings:
        """The settings named in `data` (a config section or dataclass with these fields)."""
        values = {f.name: data[f.name] if hasattr(data, "keys") else getattr(data, f.name)
                  for f in fields(cls)}  # fmt: skip
        values["supercell"] = tuple(int(n) for n in values["supercell"])
        values["train_temperatures"] = tuple(float(t) for t in values["train_temperatures"])
        return cls(**values)

    def key(self) -> str:
        text = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Structures:
    """S structures of n atoms each, as tensors (float64 positions for exact autograd)."""

    positions: Tensor  # (S, n, 3) Angstrom
    cells: Tensor  # (S, 3, 3) rows are the lattice vectors
    numbers: Tensor  # (S, n) atomic numbers
    energy: Tensor  # (S,) eV
    forces: Tensor  # (S, n, 3) eV / Angstrom
    temperature: Tensor  # (S,) K
    edges: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (src, dst, shift)

    def __len__(self) -> int:
        return self.positions.shape[0]


def _trajectory(settings: MDSettings, temperature: float, seed: int) -> dict[str, np.ndarray]:
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=settings.lattice, cubic=True).repeat(settings.supercell)
    if settings.au_fraction > 0:
        n_au = round(settings.au_fraction * len(atoms))
        symbols = np.array(atoms.get_chemical_symbols())
        symbols[rng.choice(len(atoms), n_au, replace=False)] = "Au"
        atoms.set_chemical_symbols(symbols.tolist())
    scale = 1 + rng.uniform(-settings.strain, settings.strain, 3)
    atoms.set_cell(atoms.cell[:] * scale[:, None], scale_atoms=True)
    atoms.calc = EMT()
    atoms.set_constraint(FixCom())
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms,
        settings.timestep_fs * units.fs,
        temperature_K=temperature,
        friction=settings.friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    dyn.run(settings.equilibrate)
    out: dict[str, list] = {k: [] for k in ("positions", "cells", "numbers", "energy", "forces")}
    for _ in range(settings.frames):
        dyn.run(settings.sample_every)
        out["positions"].append(atoms.get_positions())
        out["cells"].append(np.array(atoms.cell[:]))
        out["numbers"].append(atoms.get_atomic_numbers())
        out["energy"].append(atoms.get_potential_energy())
        out["forces"].append(atoms.get_forces())
    arrays = {k: np.asarray(v) for k, v in out.items()}
    arrays["temperature"] = np.full(settings.frames, temperature)
    return arrays


def generate(settings: MDSettings) -> dict[str, dict[str, np.ndarray]]:
    """{"train": arrays, "test": arrays}: every trajectory, seeded from settings.seed."""
    from tqdm import tqdm

    temps = [*settings.train_temperatures, settings.test_temperature]
    jobs = [(t, k) for t in temps for k in range(settings.trajectories)]
    parts: dict[float, list] = {t: [] for t in temps}
    for i, (t, _) in enumerate(tqdm(jobs, desc="EMT molecular dynamics", unit="traj")):
        parts[t].append(_trajectory(settings, t, seed=settings.seed * 100_003 + i))

    def stack(ts):
        runs = [r for t in ts for r in parts[t]]
        return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}

    return {"train": stack(settings.train_temperatures), "test": stack([settings.test_temperature])}


def load(settings: MDSettings, cache_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """The generated data, from `cache_dir` when present, else generated and cached."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"emt-md-{settings.key()}.npz"
    with open(cache_dir / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            data = generate(settings)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            flat = {f"{split}/{k}": v for split, arrays in data.items() for k, v in arrays.items()}
            np.savez(tmp, settings=json.dumps(asdict(settings)), **flat)
            os.replace(tmp, path)
    with np.load(path) as stored:
        out: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
        for name in stored.files:
            if "/" in name:
                split, key = name.split("/")
                out[split][key] = stored[name]
    return out


def neighbours(
    positions: np.ndarray, cell: np.ndarray, cutoff: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Periodic neighbour pairs within `cutoff`: (src, dst, shift), with the edge vector
    r = pos[dst] - pos[src] + shift @ cell (ASE's neighbour list, all periodic images)."""
    from ase.neighborlist import primitive_neighbor_list

    src, dst, shift = primitive_neighbor_list(
        "ijS", (True, True, True), cell, positions, cutoff, self_interaction=False
    )
    return (
        torch.from_numpy(src).long(),
        torch.from_numpy(dst).long(),
        torch.from_numpy(shift).to(torch.float64),
    )


def to_structures(arrays: dict[str, np.ndarray], cutoff: float) -> Structures:
    """Tensors of one split, with each structure's neighbour list."""
    s = Structures(
        positions=torch.from_numpy(arrays["positions"]),
        cells=torch.from_numpy(arrays["cells"]),
        numbers=torch.from_numpy(arrays["numbers"]).long(),
        energy=torch.from_numpy(arrays["energy"]),
        forces=torch.from_numpy(arrays["forces"]),
        temperature=torch.from_numpy(arrays["temperature"]),
    )
    s.edges = [
        neighbours(p, c, cutoff) for p, c in zip(arrays["positions"], arrays["cells"], strict=True)
    ]
    return s


@dataclass
class GraphBatch:
    """Several structures as one graph: what the model and the loss read."""

    positions: Tensor  # (N, 3)
    numbers: Tensor  # (N,)
    batch: Tensor  # (N,) structure index
    cells: Tensor  # (G, 3, 3)
    src: Tensor  # (E,)
    dst: Tensor  # (E,)
    shifts: Tensor  # (E, 3) integer lattice shifts of the dst image
    energy: Tensor  # (G,)
    forces: Tensor  # (N, 3)
    atoms: Tensor  # (G,) atoms per structure
    num_graphs: int

    def to(self, device: torch.device, dtype: torch.dtype) -> GraphBatch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        fields = {k: move(v) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return GraphBatch(**fields)


def collate(data: Structures, index: list[int]) -> GraphBatch:
    """The structures `index` of `data` as one GraphBatch (CPU, float64)."""
    n = data.positions.shape[1]
    offsets = [k * n for k in range(len(index))]
    src, dst, shifts = zip(*(data.edges[i] for i in index), strict=True)
    return GraphBatch(
        positions=data.positions[index].reshape(-1, 3),
        numbers=data.numbers[index].reshape(-1),
        batch=torch.arange(len(index)).repeat_interleave(n),
        cells=data.cells[index],
        src=torch.cat([s + o for s, o in zip(src, offsets, strict=True)]),
        dst=torch.cat([d + o for d, o in zip(dst, offsets, strict=True)]),
        shifts=torch.cat(shifts),
        energy=data.energy[index],
        forces=data.forces[index].reshape(-1, 3),
        atoms=torch.full((len(index),), n),
        num_graphs=len(index),
    )
