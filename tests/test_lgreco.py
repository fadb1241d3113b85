"""L-GreCo: the knapsack DP against brute force, the budget, the schedule, and the
controller inside 2-process DDP (same levels on every rank, fewer bytes, within budget)."""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import pytest
import torch
from mp_utils import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradlane.compressors import (
    QSGD,
    Controller,
    GradientExchange,
    PowerSGD,
    TopK,
    choose,
    fitted,
    knapsack,
)


def _brute(costs, weights, capacity):
    """min total cost over all choices with total weight <= capacity (None: nothing fits)."""
    best = None
    for pick in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        rows = range(costs.shape[0])
        if sum(int(weights[r, c]) for r, c in zip(rows, pick, strict=True)) <= capacity:
            cost = sum(float(costs[r, c]) for r, c in zip(rows, pick, strict=True))
            best = cost if best is None else min(best, cost)
    return best


def test_knapsack_finds_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        rows, choices = 1 + trial % 5, 1 + trial % 4
        costs = torch.randint(1, 50, (rows, choices), generator=gen).double()
        weights = torch.randint(0, 12, (rows, choices), generator=gen)
        capacity = int(torch.randint(0, 30, (1,), generator=gen))
        want = _brute(costs, weights, capacity)
        pick = knapsack(costs, weights, capacity)
        if want is None:
            assert pick is None
            continue
        assert sum(int(weights[r, c]) for r, c in enumerate(pick)) <= capacity
        assert sum(float(costs[r, c]) for r, c in enumerate(pick)) == want


def test_choice_keeps_to_the_budget_and_beats_no_feasible_alternative_it_could_see():
    gen = torch.Generator().manual_seed(1)
    for trial in range(120):
        rows, choices = 2 + trial % 4, 2 + trial % 3
        # more bytes, less error: each row's candidates are ordered like compression levels
        sizes = torch.rand(rows, choices, generator=gen).cumsum(1).double() * 100
        errors = torch.rand(rows, choices, generator=gen).flip(1).cumsum(1).flip(1).double()
        errors *= torch.rand(rows, 1, generator=gen).double() * 10  # layers differ in scale
        default = torch.randint(0, choices, (rows,), generator=gen)
        alpha = [0.5, 1.0, 1.5][trial % 3]
        bins = [7, 100, 10000][trial % 3]
        pick = choose(errors, sizes, default, alpha, bins)
        r = torch.arange(rows)
        budget = alpha * float(errors[r, default].sum())
        feasible = [
            p
            for p in itertools.product(range(choices), repeat=rows)
            if float(errors[r, list(p)].sum()) <= budget
        ]
        if not feasible:  # nothing fits: the least error per layer
            assert torch.equal(pick, errors.argmin(1))
            continue
        assert float(errors[r, pick].sum()) <= budget * (1 + 1e-12)
        optimum = min(float(sizes[r, list(p)].sum()) for p in feasible)
        assert float(sizes[r, pick].sum()) >= optimum - 1e-9
        if alpha >= 1:
            assert float(sizes[r, pick].sum()) <= float(sizes[r, default].sum()) + 1e-9
        if bins == 10000:  # fine enough here to find the true optimum
            assert float(sizes[r, pick].sum()) == pytest.approx(optimum)


def test_schedule_measures_the_last_steps_before_each_decision():
    c = Controller(PowerSGD(4), start_iter=10, adjust_every=100, accumulate=3)
    assert [s for s in range(400) if c.due(s)] == [10, 110, 210, 310]
    assert [s for s in range(220) if c.accumulating(s)] == [7, 8, 9, 107, 108, 109, 207, 208, 209]
    c = Controller(PowerSGD(4), start_iter=0, adjust_every=5, accumulate=2)
    assert [s for s in range(16) if c.due(s)] == [5, 10, 15]  # nothing to measure at step 0
    assert [s for s in range(16) if c.accumulating(s)] == [3, 4, 8, 9, 13, 14]


def test_candidates_surround_the_default():
    assert Controller(PowerSGD(4)).candidates == [2, 3, 4, 5, 6, 7, 8]
    assert Controller(QSGD(5)).candidates == [2, 3, 4, 5, 6, 8]
    assert Controller(TopK(0.01)).candidates == [0.0025, 0.005, 0.01, 0.02, 0.04]
    assert Controller(PowerSGD(4), candidates=[1, 16]).candidates == [1, 4, 16]


class Layers(nn.Module):
    """Fed inputs of rank 2, the first layer's gradient has rank 2 (lower levels cost it
    nothing) while the others' are full rank and differ in scale: levels should differ."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(24, 48)
        self.mid = nn.Linear(48, 48)
        self.last = nn.Linear(48, 32)

    def forward(self, x):
        x = torch.tanh(self.first(x))
        x = torch.tanh(self.mid(x) + torch.randn_like(x)) * 0.05
        return self.last(x)


def _lgreco_ranks(rank, world, compressor, outdir):
    from gradlane import register_comm_hook

    torch.manual_seed(0)
    model = Layers()
    ddp = DDP(model, bucket_cap_mb=0.004)
    cfg = {"hook": "lgreco", "compressor": compressor, "start_iter": 2, "adjust_every": 4}
    cfg |= {"accumulate": 2, "alpha": 1.0, "rank": 4, "density": 0.1, "bits": 4}
    hook = register_comm_hook(ddp, cfg)
    state = hook.state
    gen = torch.Generator().manual_seed(rank)
    basis = torch.randn(2, 24, generator=torch.Generator().manual_seed(9))
    seen = []
    for _ in range(11):
        x = torch.randn(32, 2, generator=gen) @ basis
        ddp(x).square().mean().backward()
        model.zero_grad()
        seen.append((dict(state.levels), hook.metrics()))
    if rank == 0:
        state.save_artifacts(Path(outdir))
    default = state.compressor.default
    uniform = sum(state.compressor.wire_bytes(s, default) for s in state.shapes.values())
    chosen = sum(state.compressor.wire_bytes(s, state.levels[n]) for n, s in state.shapes.items())
    return {"seen": seen, "uniform": uniform, "chosen": chosen, "last": state.controller.last}


@pytest.mark.parametrize("compressor", ["powersgd", "topk", "qsgd"])
def test_controller_in_ddp_agrees_across_ranks_and_saves_bytes_within_budget(compressor, tmp_path):
    r0, r1 = run_ranks(_lgreco_ranks, 2, compressor, str(tmp_path))
    for (levels0, m0), (levels1, m1) in zip(r0["seen"], r1["seen"], strict=True):
        assert levels0 == levels1  # the same decision everywhere
        assert m0["comm/bytes_per_step"] == m1["comm/bytes_per_step"]
    _, metrics = r0["seen"][-1]
    assert metrics["comm/decisions"] == 3  # steps 2, 6, 10
    assert r0["last"]["error_ratio"] <= 1.0 + 1e-9  # alpha = 1
    assert r0["chosen"] < r0["uniform"]  # the layers' gradients differ: levels differ
    assert r0["last"]["bytes_ratio"] == pytest.approx(r0["uniform"] / r0["chosen"])
    assert (tmp_path / "comm_levels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SHAPES = {"a": (64, 48), "b": (96, 32), "c": (40, 40), "d": (128, 16)}
SCALES = {"a": 1.0, "b": 0.1, "c": 3.0, "d": 0.3}


def _measured(comm, compressor, candidates, steps=120):
    """(sum ||e'||^2 / sum ||g||^2 after step 40, bytes per step, the controller, the same
    error ratio since the controller's last decision) of error feedback run on steady
    synthetic gradients: a scaled rank-3 signal plus noise."""
    gen = torch.Generator().manual_seed(0)
    basis = {
        k: (torch.randn(s[0], 3, generator=gen), torch.randn(3, s[1], generator=gen))
        for k, s in SHAPES.items()
    }
    model = nn.ParameterDict({k: nn.Parameter(torch.zeros(s)) for k, s in SHAPES.items()})
    ctl = Controller(
        compressor, start_iter=10, adjust_every=30, accumulate=3, candidates=candidates
    )
    exchange = GradientExchange(model, compressor, comm, start_iter=5, controller=ctl)
    residual = energy = sent = 0.0
    since = [0.0, 0.0]  # residual and energy since the last decision
    decision = ctl.last
    for step in range(steps):
        grads = []
        for k, (u, v) in basis.items():
            coef = torch.tensor([3.0, 2.0, 1.0]) * (1 + 0.2 * torch.randn(3, generator=gen))
            noise = 0.5 * torch.randn(SHAPES[k], generator=gen)
            grads.append(SCALES[k] * ((u * coef) @ v + noise))
        exchange.average(list(SHAPES), grads)
        if step >= 40:
            metrics = exchange.metrics()
            residual += metrics["comm/residual_sq"]
            energy += metrics["comm/grad_sq"]
            sent += metrics["comm/bytes_per_step"]
            if ctl.last is not decision:
                since, decision = [0.0, 0.0], ctl.last
            since[0] += metrics["comm/residual_sq"]
            since[1] += metrics["comm/grad_sq"]
    return residual / energy, sent / (steps - 40), ctl, since[0] / since[1]


@pytest.mark.parametrize(
    "make",
    [lambda: QSGD(4, 16), lambda: TopK(0.1), lambda: PowerSGD(4, 0.0)],
    ids=["qsgd", "topk", "powersgd"],
)
def test_lgreco_keeps_the_measured_error_near_uniform_while_sending_fewer_bytes(
    one_rank_comm, make
):
    """Measured, not predicted: the error feedback residual of L-GreCo's choice against
    the uniform default's, each over its own run (alpha = 1)."""
    uniform_error, uniform_bytes, predictor, _ = _measured(one_rank_comm, make(), [])
    error, sent, ctl, error_since_decision = _measured(one_rank_comm, make(), None)
    assert sent < 0.95 * uniform_bytes
    assert error <= 1.2 * uniform_error, (error, uniform_error)
    if isinstance(ctl.compressor, QSGD):  # here the model itself is close: within 25%
        # of what its last choice left behind (earlier choices predicted other levels)
        assert ctl.last["predicted_error"] == pytest.approx(error_since_decision, rel=0.25)
        assert predictor.last["predicted_error"] == pytest.approx(uniform_error, rel=0.25)


# layer -> (scale, shared signal's rank, own noise): one noise-dominated layer (its
# residual hardly depends on the rank), the others with a signal that rank shapes
TWO_RANK = {"a": (1.0, 3, 3.0), "b": (0.3, 12, 0.1), "c": (1.0, 12, 0.3), "d": (0.3, 8, 0.1)}


def _low_rank_gradients(shared, own):
    """Per layer, a signal shared by the ranks (rank and decaying spectrum in TWO_RANK) plus
    each rank's own noise (the part the shared P^ misses, which a one-rank error model does
    not see; where it dominates, raising the rank barely lowers the residual)."""
    basis = {}
    for k, (n, m) in SHAPES.items():
        r = TWO_RANK[k][1]
        basis[k] = (torch.randn(n, r, generator=shared), torch.randn(r, m, generator=shared))

    def at(step):
        grads = {}
        for k, (u, v) in basis.items():
            scale, r, noise = TWO_RANK[k]
            coef = 3 * torch.logspace(0, -1.5, r) * (1 + 0.2 * torch.randn(r, generator=shared))
            grads[k] = scale * ((u * coef) @ v + noise * torch.randn(SHAPES[k], generator=own))
        return grads

    return at


def _spiking_gradients(shared, own, spike_at=16):
    """Heavy-tailed (Student t, 3 degrees of freedom) gradients of steady scale per layer,
    but layer a's is 30x larger at step `spike_at` (as the lm GPT's loss spikes early in
    training). At 16, the step before the measured ones, the residual it leaves enters the
    first of them; at 18 the spike is inside the measured window (steps 17-19)."""
    t3 = torch.distributions.StudentT(3.0)
    scales = {"a": 1.0, "b": 0.1, "c": 1.0, "d": 0.2}

    def at(step):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=own)))  # StudentT draws
        grads = {k: scales[k] * t3.sample(s) for k, s in SHAPES.items()}
        if step == spike_at:
            grads["a"] *= 30
        return grads

    return at


def _two_rank_errors(rank, world, lgreco, make, gradients, steps=65):
    """Uniform `make()` or L-GreCo around it (alpha 1) at 2 ranks on `gradients(shared
    generator, this rank's own)`. Returns the hook's measured error sum ||e'||^2 / sum ||g||^2
    over both ranks after step 20, and the oracle's: from the gradients and the applied means
    alone, sum_w e_w = sum_t (sum_w g_w - W mean)."""
    from gradlane.compressors import TorchCollective

    comm = TorchCollective()
    model = nn.ParameterDict({k: nn.Parameter(torch.zeros(s)) for k, s in SHAPES.items()})
    ctl = Controller(make(), start_iter=5, adjust_every=15, accumulate=3)
    ctl = ctl if lgreco else Controller(make(), 5, 15, 3, candidates=[])
    exchange = GradientExchange(model, ctl.compressor, comm, start_iter=5, controller=ctl)
    gradients_at = gradients(
        torch.Generator().manual_seed(0), torch.Generator().manual_seed(1 + rank)
    )
    lag = {k: torch.zeros(s) for k, s in SHAPES.items()}  # sum_t (sum_w g_w - W mean)
    residual = energy = oracle_residual = 0.0
    sent = []
    for step in range(steps):
        grads = gradients_at(step)
        applied = {k: g.clone() for k, g in grads.items()}
        exchange.average(list(SHAPES), list(applied.values()))
        for k, g in grads.items():
            total = g.clone()
            comm.all_reduce(total)  # sum_w g_w
            lag[k] += total - world * applied[k]
        if step >= 20:  # after the first decision that can change levels
            metrics = exchange.metrics()
            residual += metrics["comm/residual_sq"]
            energy += metrics["comm/grad_sq"]
            sent.append(metrics["comm/bytes_per_step"])
            mine = {k: exchange.errors[k].clone() for k in SHAPES}  # the hook's own residual
            for k, e in mine.items():
                comm.all_reduce(e)
                torch.testing.assert_close(e, lag[k], rtol=1e-4, atol=1e-4 * float(lag[k].norm()))
            oracle_residual += sum(float(x.square().sum()) for x in lag.values())
    sums = torch.tensor([residual, energy])
    comm.all_reduce(sums)
    return {
        "measured": float(sums[0] / sums[1]),
        "oracle_lag": oracle_residual / float(sums[1]),
        "bytes": sum(sent) / len(sent),
        "levels": dict(exchange.levels),
        "predicted": ctl.last["predicted_error"],
    }


def _both(rank, world, make, gradients, steps):
    return [_two_rank_errors(rank, world, lgreco, make, gradients, steps) for lgreco in (0, 1)]


def test_lgreco_measured_error_at_two_ranks_stays_within_uniforms():
    """The budget is a budget on measured error: at 2 ranks, where the one-rank error model
    is far below the real residual, L-GreCo's measured error (checked against the oracle
    from the gradients) stays <= uniform r4's while it sends fewer bytes. (Fitting only by
    scaling the model to the measurement made it 1.027x uniform's here: it bought a lower
    rank elsewhere with a higher rank of the noise-dominated layer, which did not pay.)"""
    (uniform, lgreco), _ = run_ranks(_both, 2, partial(PowerSGD, 4, 0.0), _low_rank_gradients, 65)
    assert lgreco["bytes"] < 0.95 * uniform["bytes"], (lgreco, uniform)
    assert lgreco["measured"] <= uniform["measured"], (lgreco, uniform)
    assert lgreco["predicted"] == pytest.approx(lgreco["measured"], rel=0.5)


def test_lgreco_qsgd_error_after_a_gradient_spike_stays_within_uniforms():
    """A residual is measured against the M it came from: after layer a's gradient spike,
    the residual entering the first measured step is 30x that step's gradient. Paired with
    the step's gradient instead, as the steady-state relation would, it made a's 4-bit
    error look ~100x its real value; L-GreCo then bought 6 bits for a with 3 bits elsewhere
    and measured (against the oracle from the gradients) above uniform 4-bit's."""
    (uniform, lgreco), _ = run_ranks(_both, 2, partial(QSGD, 4, 16), _spiking_gradients, 35)
    assert lgreco["measured"] <= uniform["measured"], (lgreco, uniform)
    assert lgreco["bytes"] <= uniform["bytes"], (lgreco, uniform)


def test_lgreco_qsgd_widths_from_a_window_with_a_spike_stay_within_uniforms():
    """A spike inside the measured window (layer a 30x at step 18 of 17-19). Summed over the
    window, a's energy set the widths as if a dominated every step: with the window's sums
    L-GreCo measured 0.85 (oracle) against uniform 4-bit's 0.028 after the decision. Each
    measured step now counts alike (`Controller._shares`)."""
    spiking = partial(_spiking_gradients, spike_at=18)
    (uniform, lgreco), _ = run_ranks(_both, 2, partial(QSGD, 4, 16), spiking, 35)
    assert lgreco["measured"] <= uniform["measured"], (lgreco, uniform)
    assert lgreco["bytes"] <= uniform["bytes"], (lgreco, uniform)


def test_candidate_errors_are_fitted_to_the_residual_measured_at_each_level(one_rank_comm):
    """The measured omega R / (G + R) at the current level and the model's are recorded;
    the budget at the default is its measurement, however far off the model is (here 300x
    its residual); a level measured earlier keeps its own fit; a layer never measured
    keeps its level at the first decision."""
    psgd = PowerSGD(4, 0.0)
    ctl = Controller(psgd, start_iter=1, adjust_every=2, accumulate=1, candidates=[2, 8])
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(32, 24, generator=gen) @ torch.diag(torch.logspace(0, -2, 24))
    shapes, grad_sq = {"w": m.shape}, float(m.square().sum())
    ctl.observe("w", m, torch.tensor(grad_sq), None, torch.tensor(True))  # no residual yet
    assert ctl.decide(shapes, {"w": 8}, one_rank_comm, m.device) == {"w": 8}

    def omega_at(level):
        omega = psgd.errors(m, ctl.candidates, "w") / m.double().square().sum()
        return float(omega[ctl.candidates.index(level)])

    def decide(level, factor):
        residual = factor * grad_sq * omega_at(level) / (1 - omega_at(level))
        ctl.observe("w", m, torch.tensor(grad_sq), torch.tensor(residual), torch.tensor(True))
        ctl.decide(shapes, {"w": level}, one_rank_comm, m.device)
        return residual, residual / (grad_sq + residual)  # R and the measured omega

    residual, measured = decide(4, 300.0)
    assert ctl.last["predicted_uniform_error"] == pytest.approx(residual / grad_sq)
    assert ctl.calibration["w"][4] == pytest.approx((measured, omega_at(4)))
    _, measured_2 = decide(2, 0.5)
    assert ctl.last["predicted_uniform_error"] == pytest.approx(residual / grad_sq)
    assert ctl.calibration["w"][2] == pytest.approx((measured_2, omega_at(2)))


def test_fit_is_exact_at_the_measured_level_and_the_worse_of_scaled_and_shifted_elsewhere():
    """odds(w) = w / (1 - w). Measured above the model (an excess): a lower-error candidate
    keeps the excess (shifted), a higher-error one grows with the model (scaled)."""

    def odds(w):
        return w / (1 - w)

    modelled, measured = torch.tensor(0.01, dtype=torch.float64), torch.tensor(0.4)
    omega = torch.tensor([0.002, 0.01, 0.05], dtype=torch.float64)  # levels above, at, below
    got = fitted(omega, measured.double(), modelled)
    want = [odds(0.002 + 0.39), odds(0.4), odds(0.05) * odds(0.4) / odds(0.01)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    below = fitted(omega, torch.tensor(0.005, dtype=torch.float64), modelled)  # model too high
    scaled = odds(omega) * odds(0.005) / odds(0.01)
    torch.testing.assert_close(below, odds(omega * 0.5).maximum(scaled))
