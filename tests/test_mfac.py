"""M-FAC against an exact dense fp64 solve, its bookkeeping, and exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from gradlane.optimizers import MFAC

F64 = torch.float64


def fisher_solve(window: list[torch.Tensor], g: torch.Tensor, damp: float) -> torch.Tensor:
    """(damp*I + (1/k) G^T G)^{-1} g with a dense d x d solve (the oracle)."""
    G = torch.stack(window).to(F64)
    F = damp * torch.eye(G.shape[1], dtype=F64) + G.T @ G / G.shape[0]
    return torch.linalg.solve(F, g.to(F64))


def gradient_stream(d: int, steps: int, seed: int = 0, rank: int = 3):
    """Correlated gradients (a few shared directions plus noise), like a training run's."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=gen, dtype=F64)
    for _ in range(steps):
        yield torch.randn(rank, generator=gen, dtype=F64) @ basis + 0.1 * torch.randn(
            d, generator=gen, dtype=F64
        )


def take_step(opt: MFAC, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Set p.grad = g, step, and return the change of p."""
    before = p.detach().clone()
    p.grad = g.to(p.dtype).clone()
    opt.step()
    return p.detach() - before


@pytest.mark.parametrize("d,m,damp", [(60, 8, 1e-3), (40, 1, 1e-2), (24, 32, 1e-4)])
def test_matches_dense_solve_through_warmup_and_wraparounds(d, m, damp):
    p = torch.zeros(d, dtype=F64, requires_grad=True)
    opt = MFAC([p], lr=1.0, ngrads=m, damp=damp, momentum=0.0, window_dtype="float64")
    seen, worst = [], 0.0
    for g in gradient_stream(d, steps=6 * m + 5):
        seen.append(g)
        want = fisher_solve(seen[-m:], g, damp)
        got = -take_step(opt, p, g)
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    assert worst < 1e-8
    assert opt.state["mfac"]["count"] == 6 * m + 5 and opt.skipped_steps == 0


def test_bf16_window_preconditions_the_stored_gradients():
    d, m, damp = 300, 6, 1e-2
    p = torch.zeros(d, requires_grad=True)
    opt = MFAC([p], lr=1.0, ngrads=m, damp=damp, momentum=0.0, window_dtype="bfloat16")
    assert opt.state == {} and opt.window_dtype == torch.bfloat16
    stored = []
    for g in gradient_stream(d, steps=3 * m):
        stored.append(g.float().bfloat16())
        want = fisher_solve(stored[-m:], stored[-1], damp)
        got = -take_step(opt, p, g)
        assert ((got.double() - want).norm() / want.norm()) < 3e-4  # fp32 products, cond(K)~1e4
    assert opt.state["mfac"]["rows"].dtype == torch.bfloat16


def test_momentum_weight_decay_and_param_groups_follow_the_documented_update():
    torch.manual_seed(0)
    a = torch.randn(20, dtype=F64, requires_grad=True)
    b = torch.randn(4, 5, dtype=F64, requires_grad=True)
    c = torch.randn(7, dtype=F64, requires_grad=True)
    damp, mom = 1e-2, 0.9
    groups = [
        {"params": [a], "lr": 0.1, "weight_decay": 0.05},  # coupled
        {"params": [b], "lr": 0.02, "weight_decay": 0.3, "decoupled_weight_decay": True},
        {"params": [c], "lr": 0.05},
    ]
    opt = MFAC(groups, ngrads=4, damp=damp, momentum=mom, window_dtype="float64")
    ref = [t.detach().clone() for t in (a, b, c)]
    bufs = [torch.zeros_like(t) for t in ref]
    window = []
    for step, g in enumerate(gradient_stream(47, steps=11)):
        ga, gb, gc = g[:20], g[20:40].view(4, 5), g[40:]
        c_has_grad = step % 3 != 1  # c sometimes has no gradient: skipped, zeros in the window
        for t, gt in ((a, ga), (b, gb), (c, gc)):
            t.grad = gt.clone()
        if not c_has_grad:
            c.grad = None
        opt.step()
        # the oracle: coupled decay enters the window, decoupled decay does not
        flat = torch.cat([ga + 0.05 * ref[0], gb.reshape(-1), gc if c_has_grad else 0 * gc])
        window.append(flat)
        u = fisher_solve(window[-4:], flat, damp)
        parts = (u[:20], u[20:40].view(4, 5), u[40:])
        for i, (lr, wd) in enumerate(((0.1, 0.0), (0.02, 0.3), (0.05, 0.0))):
            if i == 2 and not c_has_grad:
                continue
            ref[i] = ref[i] * (1 - lr * wd)
            bufs[i] = mom * bufs[i] + parts[i]
            ref[i] = ref[i] - lr * bufs[i]
        for t, r in zip((a, b, c), ref, strict=True):
            torch.testing.assert_close(t.detach(), r, rtol=1e-9, atol=1e-10)


def test_non_finite_gradient_is_rejected_and_leaves_everything_untouched():
    p = torch.zeros(30, dtype=F64, requires_grad=True)
    opt = MFAC([p], lr=0.5, ngrads=5, damp=1e-2, momentum=0.5, window_dtype="float64")
    stream = list(gradient_stream(30, steps=9))
    for g in stream[:7]:
        take_step(opt, p, g)
    snapshot = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state["mfac"].items()}
    momentum = opt.state[p]["momentum_buffer"].clone()
    for bad in (float("nan"), float("inf")):
        g = stream[7].clone()
        g[3] = bad
        with pytest.warns(RuntimeWarning, match="not finite"):
            assert take_step(opt, p, g).abs().max() == 0
    assert opt.skipped_steps == 2
    for k, v in snapshot.items():
        if torch.is_tensor(v):
            assert torch.equal(opt.state["mfac"][k], v), k
        elif k != "skipped":
            assert opt.state["mfac"][k] == v, k
    assert torch.equal(opt.state[p]["momentum_buffer"], momentum)
    assert take_step(opt, p, stream[7]).abs().max() > 0  # and training goes on


def test_gradient_that_makes_the_window_singular_is_rejected():
    # damp far below fp32 rounding of ||g||^2 = 1e7, and a window of near-copies of g
    p = torch.zeros(1000, requires_grad=True)
    opt = MFAC([p], lr=0.1, ngrads=4, damp=1e-12)
    g = 100 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        take_step(opt, p, g * (1 + 1e-7 * i))
    gram = opt.state["mfac"]["gram"].clone()
    with pytest.warns(RuntimeWarning, match="increase damp"):
        assert take_step(opt, p, g * (1 + 3e-7)).abs().max() == 0
    assert opt.skipped_steps == 1 and opt.state["mfac"]["count"] == 3
    assert torch.equal(opt.state["mfac"]["gram"], gram)


def _model_and_batches(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(20)
    ]
    return model, batches


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("window_dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_mid_window_resumes_exactly(window_dtype):
    def build(model):
        return MFAC(
            model.parameters(),
            lr=0.01,
            ngrads=6,
            damp=1e-2,
            momentum=0.9,
            weight_decay=1e-3,
            window_dtype=window_dtype,
        )

    model, batches = _model_and_batches(0)
    opt = build(model)
    _train(model, opt, batches[:9])  # one full lap and 3 slots into the second
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[9:])

    resumed, _ = _model_and_batches(1)  # different initial weights, overwritten below
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert ckpt["opt"]["state"]["mfac"]["rows"].dtype == getattr(torch, window_dtype)
    _train(resumed, opt2, batches[9:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opt.state["mfac"]["inv"], opt2.state["mfac"]["inv"])


def test_loading_into_an_optimizer_with_another_window_shape_is_refused():
    model, batches = _model_and_batches(0)
    opt = MFAC(model.parameters(), ngrads=4)
    _train(model, opt, batches[:2])
    other = MFAC(model.parameters(), ngrads=8)
    other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="ngrads"):
        _train(model, other, batches[2:3])


def test_small_language_model_loss_falls():
    from gradlane.recipes.lm.data import load_corpus, random_batch
    from gradlane.recipes.lm.model import GPT

    torch.manual_seed(0)
    corpus = load_corpus(max_bytes=200_000)
    model = GPT(n_layer=1, n_head=2, d_model=32, context=32)
    opt = MFAC(model.parameters(), lr=3e-3, ngrads=16)  # the lm recipe's lr, default damp
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = model.loss(random_batch(corpus.train, 16, 33, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < losses[0] - 1.5  # 5.5 -> about 2.8 nats


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"ngrads": 0}, "ngrads=0"),
        ({"ngrads": 2.5}, "ngrads=2.5"),
        ({"damp": 0.0}, "damp=0.0"),
        ({"damp": -1e-3}, "damp=-0.001"),
        ({"lr": -0.1}, "lr=-0.1"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"window_dtype": "float8"}, "window_dtype='float8'"),
    ],
)
def test_bad_settings_raise_a_one_line_value_error(kwargs, key):
    with pytest.raises(ValueError) as info:
        MFAC([torch.zeros(3, requires_grad=True)], **kwargs)
    assert type(info.value) is ValueError
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


def test_freezing_before_the_first_step_equals_an_optimizer_built_without_the_frozen():
    model, batches = _model_and_batches(0)
    twin, _ = _model_and_batches(0)
    opt = MFAC(model.parameters(), lr=0.01, ngrads=4)
    model[0].bias.requires_grad_(False)  # after building the optimizer, before its first step
    twin[0].bias.requires_grad_(False)
    twin_opt = MFAC([p for p in twin.parameters() if p.requires_grad], lr=0.01, ngrads=4)
    _train(model, opt, batches[:6])
    _train(twin, twin_opt, batches[:6])
    assert opt.state["mfac"]["rows"].shape == (4, 6 * 16 + 16 * 2 + 2)  # no column for the bias
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("which,change", [(0, "now frozen"), (2, "now trainable")])
def test_changing_requires_grad_after_the_first_step_raises_a_clear_error(which, change):
    model, batches = _model_and_batches(0)
    if change == "now trainable":
        model[2].weight.requires_grad_(False)
    opt = MFAC(model.parameters(), lr=0.01, ngrads=4)
    _train(model, opt, batches[:2])
    before = [p.detach().clone() for p in model.parameters()]
    model[which].weight.requires_grad_(change == "now trainable")
    with pytest.raises(ValueError) as info:
        _train(model, opt, batches[2:3])
    message = str(info.value)
    assert type(info.value) is ValueError and "\n" not in message
    assert message.startswith("MFAC: the trainable parameters changed after the first step")
    shape = tuple(model[which].weight.shape)
    assert f"{change}: param_groups[0]['params'][{which}] of shape {shape}" in message
    assert message.endswith("build a new optimizer")
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)  # nothing was updated
