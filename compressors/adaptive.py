"""L-GreCo: choose each layer's compression level by a knapsack over bytes and error.

Alimohammadi, Markov, Frantar & Alistarh, "L-GreCo: Layerwise-Adaptive Gradient
Compression for Efficient and Accurate Deep Learning", MLSys 2024. Every
`adjust_every` steps, with err[l, c] the compression error of layer l's gradient
(summed over the last `accumulate` steps, after error feedback) at candidate
level c and size[l, c] the bytes it would send, pick one c_l per layer to

    minimise  sum_l size[l, c_l]   subject to   sum_l err[l, c_l] <= alpha * sum_l err[l, default]

Errors are discretised into `bins` units of the budget and the knapsack is solved
by dynamic programming over the used budget, then backtracked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Level, check_positive_int
from .collective import Collective


def knapsack(costs: Tensor, weights: Tensor, capacity: int) -> list[int] | None:
    """One choice per row minimising sum costs[l, c_l] with sum weights[l, c_l] <= capacity.

    `weights` are non-negative integers. DP over the exact total weight,
    O(rows x choices x capacity); None when no choice fits."""
    rows, choices = costs.shape
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)  # best[w]: min cost at weight w
    best[0] = 0.0
    back = torch.zeros(rows, capacity + 1, dtype=torch.int16)
    for layer in range(rows):
        new = torch.full_like(best, inf)
        for c in range(choices):
            w = int(weights[layer, c])
            if w > capacity:
                continue
            shifted = torch.full_like(best, inf)
            shifted[w:] = best[: capacity + 1 - w] + float(costs[layer, c])
            better = shifted < new
            new = torch.where(better, shifted, new)
            back[layer][better] = c
        best = new
    cost, w = best.min(0)
    if cost.isinf():
        return None
    picks, w = [], int(w)
    for layer in reversed(range(rows)):
        c = int(back[layer, w])
        picks.append(c)
        w -= int(weights[layer, c])
    return picks[::-1]


def choose(errors: Tensor, sizes: Tensor, default: Tensor, alpha: float, bins: int) -> Tensor:
    """L-GreCo's per-layer choice (indices into the candidates) under the error budget.

    Errors are rounded *up* to units of budget / bins, so the DP's choice never
    exceeds the budget. The uniform `default` is kept when it fits and sends fewer
    bytes (the rounding can hide it); when nothing fits (alpha < 1 on a hard
    instance) each layer takes its least-error candidate."""
    rows = torch.arange(errors.shape[0])
    default_error = errors[rows, default].sum()
    budget = alpha * default_error
    if budget > 0:
        weights = torch.ceil(errors / (budget / bins))
    else:
        weights = torch.where(errors > 0, bins + 1.0, 0.0)
    picks = knapsack(sizes, weights.clamp(max=bins + 1).long(), bins)
    if default_error <= budget and (
        picks is None or sizes[rows, default].sum() < sizes[rows, picks].sum()
    ):
        return default.clone()
    if picks is None:
        return errors.argmin(1)
    return torch.tensor(picks)


class Controller:
    """When to measure and decide, the accumulated gradients, and the decision itself."""

    def __init__(
        self,
        compressor: Compressor,
        start_iter: int = 10,
        adjust_every: int = 100,
        accumulate: int = 3,
        alpha: float = 1.0,
        bins: int = 10000,
        candidates: list[Level] | None = None,
    ):
        self.compressor = compressor
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter={start_iter!r} must be an integer >= 0")
        self.start_iter = start_iter
        self.adjust_every = check_positive_int("adjust_every", adjust_every)
        self.accumulate = check_positive_int("accumulate", accumulate)
        if accumulate > adjust_every:
            raise ValueError(f"accumulate={accumulate} must be <= adjust_every={adjust_every}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha={alpha!r} must be > 0")
        self.alpha = float(alpha)
        self.bins = check_positive_int("bins", bins)
        levels = [compressor.check(c) for c in candidates or compressor.candidates()]
        self.candidates = sorted({*levels, compressor.default})
        self.accum: dict[str, Tensor] = {}
        self.decisions = 0
        self.last: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """Decide at the start of steps start_iter, start_iter + adjust_every, ... (not 0)."""
        return step >= max(self.start_iter, 1) and (step - self.start_iter) % self.adjust_every == 0

    def accumulating(self, step: int) -> bool:
        """Whether `step` is among the last `accumulate` before the next decision."""
        if step < self.start_iter:
            upcoming = self.start_iter
        else:
            upcoming = self.start_iter + ((step - self.start_iter) // self.adjust_every + 1) * (
                self.adjust_every
            )
        return upcoming - step <= self.accumulate

    def observe(self, name: str, m: Tensor) -> None:
        """Add this step's M = g + e of one layer to its running sum."""
        acc = self.accum.get(name)
        if acc is None:
            self.accum[name] = m.to(torch.float32, copy=True)
        else:
            self.accum[name] = acc.to(m.device).add_(m)

    def decide(
        self,
        shapes: dict[str, torch.Size],
        levels: dict[str, Level],
        comm: Collective,
        device: torch.device,
    ) -> dict[str, Level]:
        """New levels for every layer, identical on all ranks.

        Each rank measures every candidate's error on its own accumulated
        gradients; the table is summed over ranks, rank 0 solves the knapsack and
        broadcasts the choice. Layers no rank has data for keep their level."""
        names, cands = list(shapes), self.candidates
        table = torch.zeros(len(names), len(cands) + 1, dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            if name in self.accum:
                table[i, :-1] = self.compressor.errors(self.accum[name], cands)
                table[i, -1] = 1.0
        comm.all_reduce(table)
        table = table.cpu()
        errors, seen = table[:, :-1], table[:, -1] > 0
        sizes = torch.tensor(
            [[self.compressor.wire_bytes(shapes[n], c) for c in cands] for n in names],
            dtype=torch.float64,
        )
        default = torch.full((len(names),), cands.index(self.compressor.default))
        picks = torch.tensor(
            [cands.index(levels[n]) if levels[n] in cands else int(default[0]) for n in names]
        )
        if comm.rank == 0 and seen.any():
            picks[seen] = choose(errors[seen], sizes[seen], default[seen], self.alpha, self.bins)
        shared = picks.to(device)
        comm.broadcast(shared)
        picks = shared.cpu()

        rows = torch.arange(len(names))
        self.last = {
            "bytes_ratio": float(sizes[rows, default].sum() / sizes[rows, picks].sum()),
            "error_ratio": float(
                errors[rows, picks].sum() / errors[rows, default].sum().clamp_min(1e-300)
            ),
        }
        self.decisions += 1
        self.accum.clear()
        return {n: cands[int(p)] for n, p in zip(names, picks, strict=True)}

    def state_dict(self) -> dict:
        accum = {n: a.clone() for n, a in self.accum.items()}  # these grow in place
        return {"accum": accum, "decisions": self.decisions, "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.accum = dict(state["accum"])
        self.decisions = state["decisions"]
        self.last = dict(state["last"])
