"""The equivariant task: energies and forces of EMT molecular dynamics, held-out temperature."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from gradlane.recipe import EvalSums, Task, WorkerContext

from .data import GraphBatch, MDSettings, Structures, collate, load, to_structures
from .model import ForceField, build_model, set_statistics

EVAL_BATCH = 16  # structures per evaluation forward pass
MODEL_KEYS = ("channels", "lmax", "layers", "cutoff", "radial", "radial_hidden", "readout_hidden",
              "correlation", "tp_backend")  # fmt: skip


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "gradlane" / "md"


def statistics(data: Structures) -> tuple[Tensor, float, float]:
    """(energy per atom of each element by least squares, force RMS, mean neighbours)."""
    elements = torch.unique(data.numbers)
    counts = (data.numbers[:, :, None] == elements).sum(1).double()  # (S, elements)
    per_element = torch.linalg.lstsq(counts, data.energy[:, None]).solution[:, 0]
    shift = torch.zeros(119, dtype=torch.float64)
    shift[elements] = per_element
    scale = data.forces.pow(2).mean().sqrt().item()
    neighbours = sum(len(src) for src, _, _ in data.edges) / data.numbers.numel()
    return shift, scale, neighbours


class EquivariantTask(Task):
    def __init__(self, cfg: DictConfig, ctx: WorkerContext):
        m, d = cfg.model, cfg.data
        cache = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
        arrays = load(MDSettings.of(d), cache)
        self.train = to_structures(arrays["train"], m.cutoff)
        self.test = to_structures(arrays["test"], m.cutoff)
        elements = torch.unique(torch.cat([self.train.numbers, self.test.numbers])).tolist()
        potential = build_model(m.backbone, elements, **{k: m[k] for k in MODEL_KEYS})
        shift, self.scale, neighbours = statistics(self.train)
        set_statistics(potential, shift, self.scale, neighbours)
        self.model = ForceField(potential)
        self.ctx, self.batch_size = ctx, d.batch_size
        self.energy_weight, self.force_weight = m.energy_weight, m.force_weight
        every = max(1, len(self.train) // max(d.eval_train, 1))
        self.train_eval = list(range(0, len(self.train), every))[: d.eval_train]
        self.test_force_std = self.test.forces.std().item()
        self.title = f"equivariant: backbone={m.backbone}, lmax={m.lmax}, C={m.channels}"

    def _to_device(self, batch: GraphBatch) -> GraphBatch:
        return batch.to(self.ctx.device, torch.get_default_dtype())

    def batch(self, step: int) -> GraphBatch:
        gen = self.ctx.generator(step)
        index = torch.randint(len(self.train), (self.batch_size,), generator=gen).tolist()
        return self._to_device(collate(self.train, index))

    def loss(self, model: nn.Module, batch: GraphBatch) -> Tensor:
        energy, forces = model(batch)
        e = ((energy - batch.energy) / batch.atoms / self.scale).pow(2).mean()
        f = ((forces - batch.forces) / self.scale).pow(2).mean()
        return self.energy_weight * e + self.force_weight * f

    def samples(self, batch: GraphBatch) -> int:
        return batch.num_graphs  # structures

    def _predict(self, model: nn.Module, data: Structures, index: list[int]):
        """(energy errors per atom (S,), force errors (S * n, 3), reference forces) in eV."""
        e_err, f_err, f_ref = [], [], []
        with torch.enable_grad():  # forces are gradients, also under the loop's no_grad
            for start in range(0, len(index), EVAL_BATCH):
                batch = self._to_device(collate(data, index[start : start + EVAL_BATCH]))
                energy, forces = model(batch, create_graph=False)
                e_err.append(((energy - batch.energy) / batch.atoms).detach())
                f_err.append((forces - batch.forces).detach())
                f_ref.append(batch.forces)
        if not e_err:
            empty = torch.zeros(0, device=self.ctx.device)
            return empty, empty.view(0, 3), empty.view(0, 3)
        return torch.cat(e_err), torch.cat(f_err), torch.cat(f_ref)

    def evaluate(self, model: nn.Module) -> EvalSums:
        sums: EvalSums = {}
        for split, data, index in (
            ("test", self.test, list(range(len(self.test)))),
            ("train", self.train, self.train_eval),
        ):
            part = index[self.ctx.shard(len(index))]
            e_err, f_err, _ = self._predict(model, data, part)
            sums[f"{split}_energy_mae_meV_atom"] = (1000 * e_err.abs().sum(), e_err.numel())
            sums[f"{split}_force_mae_meV_A"] = (1000 * f_err.abs().sum(), f_err.numel())
        return sums

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        std = 1000 * self.test_force_std
        ratio = means.get("test_force_mae_meV_A", float("nan")) / std
        return {**means, "test_force_std_meV_A": std, "test_force_mae_over_std": ratio}

    def save_artifacts(self, model: nn.Module, outdir: Path) -> None:
        """equivariant_parity.png (held-out forces, predicted vs EMT) and its numbers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        model.eval()
        e_err, f_err, f_ref = self._predict(model, self.test, list(range(len(self.test))))
        ref, pred = f_ref.flatten().cpu(), (f_ref + f_err).flatten().cpu()
        mae = 1000 * f_err.abs().mean().item()
        summary = {
            "test_force_mae_meV_A": mae,
            "test_force_std_meV_A": 1000 * self.test_force_std,
            "test_energy_mae_meV_atom": 1000 * e_err.abs().mean().item(),
            "structures": len(self.test),
        }
        (outdir / "equivariant_eval.json").write_text(json.dumps(summary, indent=2))
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(ref, pred, s=2, alpha=0.3)
        lim = float(max(ref.abs().max(), pred.abs().max()))
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
        ax.set_xlabel("EMT force component (eV/A)")
        ax.set_ylabel("predicted (eV/A)")
        ax.set_title(f"{self.title}\nheld-out MAE {mae:.1f} meV/A", fontsize=9)
        fig.tight_layout()
        fig.savefig(outdir / "equivariant_parity.png", dpi=120)
        plt.close(fig)


def build(cfg: DictConfig, ctx: WorkerContext) -> EquivariantTask:
    return EquivariantTask(cfg, ctx)
