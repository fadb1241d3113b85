"""L-GreCo: choose each layer's compression level by a knapsack over bytes and error.

Alimohammadi, Markov, Frantar & Alistarh, "L-GreCo: Layerwise-Adaptive Gradient
Compression for Efficient and Accurate Deep Learning", MLSys 2024. Every
`adjust_every` steps, with err[l, c] the error layer l would carry at candidate
level c and size[l, c] the bytes it would send, pick one c_l per layer to

    minimise  sum_l size[l, c_l]   subject to   sum_l err[l, c_l] <= alpha * sum_l err[l, default]

Errors are discretised into `bins` units of the budget and the knapsack is solved
by dynamic programming over the used budget, then backtracked.

The error model. What a level costs is the residual error feedback carries at
it, not the error of one compression. On each of the last `accumulate` steps,
every candidate's one-step relative error omega = err_c(M) / ||M||^2 is
measured on the layer's M = g + e (`Compressor.errors`: PowerSGD's real power
iteration from its warm start, TopK's exact tail, QSGD's expected rounding
error) and averaged. (Summing M over steps first, as L-GreCo's accumulation
does, inflates the residual's share: it repeats from step to step while the
gradient's noise does not.) A residual in steady state satisfies
||e||^2 = omega (||g||^2 + ||e||^2), so

    model[l, c] = G_l omega / (1 - omega),   G_l = sum of ||g_l||^2 over those steps

with omega capped at 0.999 (2-bit QSGD's max-norm rounding has omega ~ 1: its
residual grows without bound, which the one-step error hides).

The model alone is far off for PowerSGD: its one-step estimate sees this rank's M
only, while the real P^ spans the sum over ranks, so each rank's own part of M
stays in its residual (on the lm GPT at 2 ranks the measured residual was 2 to
3000 times the model's). So, as L-GreCo picks levels from errors it measures,
the error is calibrated by measurement: at each decision, for every layer whose
residual ||e||^2 was measured on all those steps at its current level c, the
measured omega_m = R / (G + R) (the steady-state relation, R = sum ||e||^2, G = sum
||g||^2) is recorded with the model's omega_c. For a biased codec (PowerSGD, TopK)
the residual persists and correlates with the gradient, and R is the residuals
entering the measured steps. For an unbiased one (QSGD, `unbiased`: E[D(C(M))] = M)
the residual is fresh rounding noise, ||e_t||^2 ~ omega ||M_t||^2 each step, and it
is set against the step that left it: on pairs of consecutive measured steps
(||e_t||^2 is known at step t + 1), with R = sum ||e_t||^2, R_in = sum ||e_(t-1)||^2,
E = sum ||M_t||^2 and G = sum ||g_t||^2 over them, the residual in steady state
(||e_t|| = ||e_(t-1)||) is

    R' = R (E - R_in) / (E - R),   omega_m = R' / (G + R'),   omega_c = sum err_c(M_t) / E

(without a pair, `accumulate` 1, as for a biased codec). Set against the next step's
gradient instead, on the lm GPT, whose gradient norm jumps 100-fold from one step to
the next early on, a spike just before the measured steps made QSGD's 4-bit omega_m
0.69 against a measured 0.02 on the steps after it. How the residual of other levels
follows is not known from one level, and two fits agree at c: scaled, the model's
residual times the measured / modelled one at c (what the one-rank model sees grows
and shrinks with the level), and shifted, omega_c' + (omega_m - omega_c) where the
measurement is above the model (the rank's own part of M that the shared P^ leaves
behind does not shrink with the rank; below the model, omega is scaled by omega_m /
omega_c). On the lm GPT, the scaled fit put head.weight's residual at rank 23 at 1/8 of what
it then measured, and the shifted fit had 8 of 16 ranks cost far less than they
did, so a candidate's error is the worse of the two:

    err[l, c'] = G_l max(odds(omega_c') odds(omega_m) / odds(omega_c), odds(w)),
    odds(x) = x / (1 - x),  w the shifted omega,  c the measured level nearest c'

(nearest in log level; a level's measurement is kept until it is measured again).
A layer not measured at any level yet keeps its level, so the first decision,
after plain all-reduce steps, changes nothing.

For an unbiased codec the knapsack weighs each layer by its share of a step's
gradient energy, averaged over the measured steps, not by its sum over them: err[l, c]
above times S_l / G_l, S_l = mean_t ||g_l,t||^2 / sum_l' ||g_l',t||^2. Its residual is
fresh noise each step, so a spike's error ends with the spike; summed, one spike
dominates the window, and the widths are set for a step that does not recur (on the lm
GPT, a step with 15-85x the energy of its neighbours fell in the first window: L-GreCo
QSGD measured 1.18x uniform 4-bit's error until the next decision). A biased codec's
residual carries a spike's energy into the following steps, and the window's sums
stand (per-step shares made L-GreCo PowerSGD's first widths costlier on that GPT: 1.063x
uniform's step at 100 Mbit/s, against 0.996x). With W_l = S_l or G_l,
sum_l err[l, c_l] / sum_l W_l is the predicted relative error, next to which the hooks
report the measured one (`comm/residual_sq` / `comm/grad_sq`).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .base import Compressor, Level, check_positive_int, square_norm
from .collective import Collective

OMEGA_MAX = 0.999  # a one-step relative error above this costs as much as 0.999 (999x G)


def knapsack(costs: Tensor, weights: Tensor, capacity: int) -> list[int] | None:
    """One choice per row minimising sum costs[l, c_l] with sum weights[l, c_l] <= capacity.

    `weights` are non-negative integers. DP over the exact total weight, one
    vectorised update per row, O(rows x choices x capacity); None when no choice fits."""
    rows, choices = costs.shape
    best = torch.full((capacity + 1,), torch.inf, dtype=torch.float64)  # min cost at weight w
    best[0] = 0.0
    back = torch.zeros(rows, capacity + 1, dtype=torch.int64)
    pad = int(weights.max()) if weights.numel() else 0  # inf below weight 0: no clamp, no mask
    padded = torch.full((pad + capacity + 1,), torch.inf, dtype=torch.float64)
    shifted = padded.unfold(0, capacity + 1, 1)  # row k: best at weight w - (pad - k), a view
    for layer in range(rows):
        padded[pad:] = best
        prev = shifted.index_select(0, pad - weights[layer])  # (choices, capacity + 1)
        prev += costs[layer].view(-1, 1).double()
        best, back[layer] = prev.min(0)  # first on ties
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


def fitted(omega: Tensor, measured: Tensor, modelled: Tensor) -> Tensor:
    """Each candidate's steady-state residual factor w / (1 - w) (times G, its residual)
    from the model's `omega` and a level's measured and modelled omega: the larger of two
    fits that agree at that level (module docstring). Scaled: the model's residual times
    the measured / modelled residual there. Shifted: omega scaled down where the model is
    above the measurement, else raised by the excess measured - modelled at every level."""

    def odds(w: Tensor) -> Tensor:
        return w / (1 - w)

    scaled = odds(omega) * odds(measured) / odds(modelled)
    below = measured <= modelled
    shift = torch.where(below, measured / modelled * omega, omega + measured - modelled)
    return torch.maximum(scaled, odds(shift.clamp(0.0, OMEGA_MAX)))


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
        if candidates is None:
            candidates = compressor.candidates()
        levels = [compressor.check(c) for c in candidates]
        self.candidates = sorted({*levels, compressor.default})
        # over the measured steps, per layer: sums of omega (per candidate), ||g||^2, ||e||^2
        # and of the steps counted (seen, residual_seen)
        self.sums: dict[str, dict[str, Tensor]] = {}
        # unbiased codecs: per layer, ||g||^2 on each measured step (0 where left out)
        self.step_grad_sq: dict[str, list[Tensor]] = {}
        # layer -> level -> (measured omega, modelled omega) at its last measurement
        self.calibration: dict[str, dict[Level, tuple[float, float]]] = {}
        # layer -> the last measured step's ||g||^2, ||e||^2, ||M||^2 and model errors, and ok
        self.previous: dict[str, tuple[dict[str, Tensor], Tensor]] = {}
        # an unbiased codec's residual is fresh noise each step: pair it with its step
        self.paired = compressor.unbiased
        self.decisions = 0
        self.decision_s = 0.0  # wall time spent in `decide` (its collectives included)
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

    def observe(
        self,
        name: str,
        m: Tensor,
        grad_sq: Tensor,
        residual_sq: Tensor | None,
        ok: Tensor,
        residual: Tensor | None = None,
    ) -> None:
        """Measure this step's one-step relative error omega of every candidate on the
        layer's M = g + e and add it, ||g||^2 and ||e||^2 (None: no residual yet) to the
        layer's sums; `ok` (a bool tensor) false leaves the step out (not finite). `residual`
        is e itself, for a codec that judges each level at its own residual (QSGD). For an
        unbiased codec, when the previous step was measured too, its ||g||^2, ||e||^2,
        ||M||^2 and model errors are added next to this ||e||^2, the residual its M left."""
        energy = square_norm(m)
        errors = self.compressor.errors(m, self.candidates, name, residual)
        omega = errors / energy.clamp_min(1e-300)
        add = {"omega": omega, "grad_sq": grad_sq.double(), "seen": torch.ones_like(energy)}
        if residual_sq is not None:
            add |= {"residual_sq": residual_sq.double(), "residual_seen": torch.ones_like(energy)}
            previous = self.previous.get(name)
            if previous is not None:  # the previous step's M left this residual
                before, before_ok = previous
                before = before | {"paired_sq": residual_sq.double()}
                add |= {k: torch.where(before_ok, v, 0.0) for k, v in before.items()}
        if self.paired:
            incoming = torch.zeros_like(energy) if residual_sq is None else add["residual_sq"]
            step = {"paired_grad_sq": add["grad_sq"], "paired_in_sq": incoming}
            self.previous[name] = (step | {"paired_energy": energy, "paired_errors": errors}, ok)
        for key, value in add.items():
            sums = self.sums.setdefault(key, {})
            sums[name] = torch.where(ok, value, 0.0) + sums.get(name, 0.0)
        if self.paired:
            self.step_grad_sq.setdefault(name, []).append(torch.where(ok, add["grad_sq"], 0.0))

    def decide(
        self,
        shapes: dict[str, torch.Size],
        levels: dict[str, Level],
        comm: Collective,
        device: torch.device,
    ) -> dict[str, Level]:
        """New levels for every layer, identical on all ranks.

        Each rank predicts every candidate's residual on its own accumulated
        gradients; the table is summed over ranks, rank 0 solves the knapsack and
        broadcasts the choice. Layers whose error no rank has measured keep their level."""
        start = time.perf_counter()
        names, cands = list(shapes), self.candidates
        table = torch.zeros(len(names), len(cands) + 2, dtype=torch.float64, device=device)
        seen = self.sums.get("seen", {})
        shares = self._shares() if self.paired else {}
        for i, name in enumerate(names):
            if name in seen:
                predicted, calibrated = self._predict(name, levels[name])
                weight = self.sums["grad_sq"][name]  # G_l; S_l for an unbiased codec
                if self.paired:
                    predicted = predicted * (shares[name] / weight.clamp_min(1e-300))
                    weight = shares[name]
                table[i, : len(cands)] = predicted
                table[i, -2] = weight
                table[i, -1] = float(calibrated)
        comm.all_reduce(table)
        table = table.cpu()
        errors, energy, calibrated = table[:, : len(cands)], table[:, -2], table[:, -1] > 0
        sizes = torch.tensor(
            [[self.compressor.wire_bytes(shapes[n], c) for c in cands] for n in names],
            dtype=torch.float64,
        )
        default = torch.full((len(names),), cands.index(self.compressor.default))
        picks = torch.tensor(
            [cands.index(levels[n]) if levels[n] in cands else int(default[0]) for n in names]
        )
        if comm.rank == 0 and calibrated.any():
            picks[calibrated] = choose(
                errors[calibrated], sizes[calibrated], default[calibrated], self.alpha, self.bins
            )
        shared = picks.to(device)
        comm.broadcast(shared)
        picks = shared.cpu()

        rows, total = torch.arange(len(names)), energy.sum().clamp_min(1e-300)
        chosen, uniform = errors[rows, picks].sum(), errors[rows, default].sum()
        self.last = {
            "bytes_ratio": float(sizes[rows, default].sum() / sizes[rows, picks].sum()),
            "error_ratio": float(chosen / uniform.clamp_min(1e-300)),
            "predicted_error": float(chosen / total),
            "predicted_uniform_error": float(uniform / total),
        }
        self.decisions += 1
        self.sums.clear()
        self.step_grad_sq.clear()
        self.previous.clear()
        self.decision_s += time.perf_counter() - start
        return {n: cands[int(p)] for n, p in zip(names, picks, strict=True)}

    def _shares(self) -> dict[str, Tensor]:
        """Each layer's share of a measured step's ||g||^2, averaged over the steps: every
        step counts alike, so one gradient spike does not set an unbiased codec's widths."""
        steps = max((len(v) for v in self.step_grad_sq.values()), default=0)
        totals = [
            sum(v[j] for v in self.step_grad_sq.values() if len(v) > j).clamp_min(1e-300)
            for j in range(steps)
        ]
        return {
            name: sum(g / totals[j] for j, g in enumerate(v)) / steps
            for name, v in self.step_grad_sq.items()
        }

    def _predict(self, name: str, level: Level) -> tuple[Tensor, bool]:
        """Each candidate's residual over the measured steps (module docstring), and
        whether it rests on a measurement: G omega / (1 - omega), with the model's omega
        (averaged over the steps) fitted to the measured level nearest the candidate.
        Records the fit at the current `level` when its residual was measured on every step
        (where measured and model are both zero, the model stands as it is)."""
        sums = self.sums
        grad_sq = sums["grad_sq"][name]
        omega = (sums["omega"][name] / sums["seen"][name].clamp_min(1)).clamp(0.0, OMEGA_MAX)
        residual_seen = sums.get("residual_seen", {}).get(name)
        measured = level in self.candidates and residual_seen is not None
        measured = measured and bool(residual_seen == sums["seen"][name])
        if measured:
            index = self.candidates.index(level)
            paired = sums.get("paired_energy", {}).get(name)
            if paired is not None and bool(paired > 0):  # e' against the M it came from
                residual, grad = sums["paired_sq"][name], sums["paired_grad_sq"][name]
                modelled = sums["paired_errors"][name][index] / paired
                # R / G in steady state (e_t = e_(t-1)), times G: R (E - R_in) / (E - R)
                fed = (paired - sums["paired_in_sq"][name]).clamp_min(0.0) * residual
                sent = (paired - residual).clamp_min(0.0)
            else:  # the residuals entering the steps against their gradients
                residual, grad, modelled = sums["residual_sq"][name], grad_sq, omega[index]
                fed, sent = residual, torch.ones_like(residual)
            if bool(modelled > 0) and bool(residual > 0):
                steady = float(fed / (grad * sent + fed))  # ||e||^2 = w (||g||^2 + ||e||^2)
                self.calibration.setdefault(name, {})[level] = (steady, float(modelled))
        known = self.calibration.get(name)
        if not known:
            return grad_sq * omega / (1 - omega), measured
        fits = [known[min(known, key=lambda k: abs(math.log(k / c)))] for c in self.candidates]
        measured_at, modelled_at = torch.tensor(fits, dtype=omega.dtype, device=omega.device).T
        return grad_sq * fitted(omega, measured_at, modelled_at), True

    def state_dict(self) -> dict:
        sums = {k: dict(v) for k, v in self.sums.items()}
        calibration = {k: dict(v) for k, v in self.calibration.items()}
        previous = {k: (dict(step), ok) for k, (step, ok) in self.previous.items()}
        return {
            "sums": sums,
            "previous": previous,
            "step_grad_sq": {k: list(v) for k, v in self.step_grad_sq.items()},
            "calibration": calibration,
            "decisions": self.decisions,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: dict(v) for k, v in state["sums"].items()}
        self.previous = {k: (dict(step), ok) for k, (step, ok) in state.get("previous", {}).items()}
        self.step_grad_sq = {k: list(v) for k, v in state.get("step_grad_sq", {}).items()}
        self.calibration = {k: dict(v) for k, v in state.get("calibration", {}).items()}
        self.decisions = state["decisions"]
        self.last = dict(state["last"])
