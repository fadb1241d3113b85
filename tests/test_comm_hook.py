"""The DDP comm hooks in real 2-process gloo DDP (and world size 1).

Oracles: each rank also computes every rank's gradient on a plain copy of the
model, so the all-reduced mean is known without the hook; error feedback must
conserve mass; training must end near plain DDP; a resumed run must match an
uninterrupted one."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from mp_utils import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradlane
from gradlane.comm import COMM_HOOKS, register_comm_hook
from gradlane.errors import ConfigError


class Net(nn.Module):
    """Mixed shapes: a 2-D embedding, a 3-D conv kernel, matrices, biases, maybe a spare."""

    def __init__(self, unused: bool = False):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 12, 3)
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 5)
        self.spare = nn.Linear(4, 4) if unused else None

    def forward(self, idx):
        x = torch.relu(self.conv(self.emb(idx).transpose(1, 2))).mean(2)
        return self.fc2(torch.relu(self.fc1(x)))


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 20, (16, 10), generator=gen), torch.randint(0, 5, (16,), generator=gen)


def _loss(model, batch):
    idx, y = batch
    return F.cross_entropy(model(idx).float(), y)


def _oracle(plain: nn.Module, world: int, step: int) -> dict[str, torch.Tensor]:
    """The mean over ranks of each parameter's gradient, in fp32, from a plain copy."""
    total = {}
    for r in range(world):
        plain.zero_grad(set_to_none=True)
        _loss(plain, _batch(r, step)).backward()
        for n, p in plain.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad.float()
    return {n: g / world for n, g in total.items()}


def _ddp(dtype: torch.dtype, unused: bool, **kwargs):
    torch.manual_seed(0)
    model = Net(unused).to(dtype)
    plain = copy.deepcopy(model)
    return model, plain, DDP(model, **kwargs)


SETUPS = {
    "several buckets": (torch.float32, False, {"bucket_cap_mb": 0.002}),
    "unused parameter": (
        torch.float32,
        True,
        {"bucket_cap_mb": 0.002, "find_unused_parameters": True},
    ),
    "bucket view": (
        torch.float32,
        False,
        {"bucket_cap_mb": 0.002, "gradient_as_bucket_view": True},
    ),
    "static graph": (torch.float32, False, {"bucket_cap_mb": 0.002, "static_graph": True}),
    "fp16 gradients": (torch.float16, False, {"bucket_cap_mb": 0.001}),
    "bf16 gradients": (torch.bfloat16, False, {"bucket_cap_mb": 0.001}),
}
LOSSLESS = {
    "powersgd": {"hook": "powersgd", "rank": 64, "min_compression_rate": 0.0, "start_iter": 0},
    "topk": {"hook": "topk", "density": 1.0, "start_iter": 0},
    "qsgd": {"hook": "qsgd", "bits": 32, "start_iter": 0},
    "lgreco-qsgd": {
        "hook": "lgreco",
        "compressor": "qsgd",
        "candidates": "32",
        "bits": 32,
        "start_iter": 1,
        "adjust_every": 2,
        "accumulate": 1,
    },
}


def _lossless(rank, world):
    """Max relative deviation from the dense mean, per (setup, hook), over 3 steps."""
    out = {}
    for setup, (dtype, unused, kwargs) in SETUPS.items():
        for name, cfg in LOSSLESS.items():
            model, plain, ddp = _ddp(dtype, unused, **kwargs)
            register_comm_hook(ddp, cfg)
            worst = 0.0
            for step in range(3):
                model.zero_grad(set_to_none=False)
                _loss(ddp, _batch(rank, step)).backward()
                want = _oracle(plain, world, step)
                for n, p in model.named_parameters():
                    if n not in want:  # the spare layer: DDP leaves it alone
                        assert p.grad is None or not p.grad.any(), n
                        continue
                    assert p.grad.dtype == dtype
                    want_n = want[n].to(dtype).float()
                    err = (p.grad.float() - want_n).abs().max() / want_n.abs().max()
                    worst = max(worst, float(err))
            out[(setup, name)] = worst
    return out


@pytest.mark.parametrize("world", [2, 1])
def test_lossless_settings_give_the_all_reduced_mean(world):
    results = run_ranks(_lossless, world)
    for got in results:
        for (setup, name), worst in got.items():
            # fp32: rounding only (PowerSGD's orthogonalisation); 16-bit: one rounding of the mean
            tol = {torch.float32: 2e-5}.get(SETUPS[setup][0], 1e-2)
            assert worst <= tol, (setup, name, worst)


def _engine(rank, world):
    """As `_lossless`, but without DDP: `build_exchange` averaged after backward, the way
    the DeepSpeed and Horovod engines call it."""
    import torch.distributed as dist

    from gradlane.comm import build_exchange
    from gradlane.compressors import TorchCollective

    out = {}
    for name, cfg in LOSSLESS.items():
        model, plain, _ = _ddp(torch.float32, False)
        exchange = build_exchange(model, cfg, TorchCollective(dist.new_group()))
        worst = 0.0
        for step in range(3):
            model.zero_grad(set_to_none=True)
            _loss(model, _batch(rank, step)).backward()
            names, params = zip(*model.named_parameters(), strict=True)
            exchange.average(list(names), [p.grad for p in params])
            want = _oracle(plain, world, step)
            for n, p in model.named_parameters():
                err = (p.grad - want[n]).abs().max() / want[n].abs().max()
                worst = max(worst, float(err))
        out[name] = (worst, exchange.step)
    return out


def test_the_engine_neutral_exchange_averages_gradients_after_backward():
    for got in run_ranks(_engine, 2):
        for name, (worst, steps) in got.items():
            assert worst <= 2e-5 and steps == 3, (name, worst, steps)
    with pytest.raises(ConfigError, match="comm.hook='torch_powersgd'"):
        from gradlane.comm import build_exchange

        build_exchange(Net(), {"hook": "torch_powersgd"}, None)


LOSSY = {
    "powersgd": {"hook": "powersgd", "rank": 1, "start_iter": 1},
    "topk": {"hook": "topk", "density": 0.1, "start_iter": 1},
    "qsgd": {"hook": "qsgd", "bits": 2, "bucket_size": 16, "start_iter": 1},
    "fp16": {"hook": "fp16"},
    "bf16": {"hook": "bf16"},
    "lgreco": {
        "hook": "lgreco",
        "compressor": "powersgd",
        "rank": 2,
        "start_iter": 1,
        "adjust_every": 2,
        "accumulate": 1,
    },
    "lgreco-qsgd": {
        "hook": "lgreco",
        "compressor": "qsgd",
        "bits": 4,
        "bucket_size": 16,
        "start_iter": 1,
        "adjust_every": 2,
        "accumulate": 1,
    },
}
POISON_STEP, STEPS = 2, 5


def _conservation(rank, world, device_branches=False):
    """Per hook: sum_t applied_t + mean_w e_w vs sum_t mean_w g_t, bytes, non-finite steps.

    At POISON_STEP rank 1's fc2.weight gradient is inf: that layer's mean must be nan on
    every rank and keep its error feedback; every other layer, in its bucket or not, goes
    on compressing. With `device_branches` the exchange takes the branches it takes on a
    GPU, where the host never reads a value: float64 norms on the device, and every
    keep-or-replace select of the residuals run instead of skipped when nothing is kept."""
    import torch.distributed as dist

    if device_branches:
        from gradlane.compressors import base, exchange

        base.host_reads_free = exchange.host_reads_free = lambda device: False
    out = {}
    for name, cfg in LOSSY.items():
        model, plain, ddp = _ddp(torch.float32, False, bucket_cap_mb=0.002)
        state = register_comm_hook(ddp, cfg).state
        applied = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        truth = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        report = {"bytes_ok": True, "poison_kept_errors": True, "others_moved": True}
        for step in range(STEPS):
            handle = None
            if step == POISON_STEP and rank == 1:
                handle = model.fc2.weight.register_hook(lambda g: g + math.inf)
            before = {n: e.clone() for n, e in state.errors.items()}
            model.zero_grad(set_to_none=False)
            _loss(ddp, _batch(rank, step)).backward()
            if handle is not None:
                handle.remove()
            want = _oracle(plain, world, step)
            for n, p in model.named_parameters():
                if step == POISON_STEP and n == "fc2.weight":
                    report["poisoned_nan"] = bool(p.grad.isnan().all())
                    report["poison_kept_errors"] &= n not in before or torch.equal(
                        before[n], state.errors[n]
                    )
                    continue
                applied[n] += p.grad
                truth[n] += want[n]
                if step == POISON_STEP and n in before and before[n].any():
                    report["others_moved"] &= not torch.equal(before[n], state.errors[n])
            metrics = state.metrics()
            if step >= cfg.get("start_iter", 0) and not name.startswith("lgreco"):
                flag = 2 if name in ("fp16", "bf16") else 4  # one per layer
                formula = sum(
                    state.compressor.wire_bytes(s, state.levels[n]) + flag
                    for n, s in state.shapes.items()
                )
                report["bytes_ok"] &= metrics["comm/bytes_per_step"] == formula
        residual = {
            n: state.errors.get(n, torch.zeros_like(p)).clone() for n, p in model.named_parameters()
        }
        for e in residual.values():
            dist.all_reduce(e)
            e /= world
        report["gap"] = max(
            float((applied[n] + residual[n] - truth[n]).abs().max() / truth[n].abs().max())
            for n in truth
        )
        report["nonfinite_steps"] = metrics["comm/nonfinite_steps"]
        report["finite_after"] = all(torch.isfinite(p.grad).all() for p in model.parameters())
        out[name] = report
    return out


@pytest.mark.parametrize("device_branches", [False, True], ids=["cpu-branches", "gpu-branches"])
def test_error_feedback_conserves_mass_and_a_non_finite_layer_is_poisoned_alone(device_branches):
    results = run_ranks(_conservation, 2, device_branches)
    for rank, got in enumerate(results):
        for name, report in got.items():
            tol = {"fp16": 5e-3, "bf16": 5e-2}.get(name, 1e-5)  # 16-bit sums round
            assert report["gap"] <= tol, (rank, name, report["gap"])
            assert report["poisoned_nan"], name
            assert report["nonfinite_steps"] == 1.0, name
            assert report["poison_kept_errors"], name
            assert report["others_moved"], name
            assert report["finite_after"], name
            assert report["bytes_ok"], name


TRAIN = {
    "none": {"hook": "none"},
    "powersgd": {"hook": "powersgd", "rank": 4, "start_iter": 5},
    "topk": {"hook": "topk", "density": 0.1, "start_iter": 5},
    "qsgd": {"hook": "qsgd", "bits": 4, "start_iter": 5},
    "fp16": {"hook": "fp16"},
    "bf16": {"hook": "bf16"},
    "lgreco-powersgd": {"hook": "lgreco", "start_iter": 5, "adjust_every": 20},
    "lgreco-topk": {
        "hook": "lgreco",
        "compressor": "topk",
        "density": 0.2,
        "start_iter": 5,
        "adjust_every": 20,
    },
    "lgreco-qsgd": {"hook": "lgreco", "compressor": "qsgd", "start_iter": 5, "adjust_every": 20},
}


def _train(rank, world):
    """Validation loss after a short lm run per hook, several buckets."""
    from gradlane.recipes.lm.data import eval_batches, load_corpus, random_batch
    from gradlane.recipes.lm.model import GPT

    corpus = load_corpus(200_000)
    out = {}
    for name, cfg in TRAIN.items():
        torch.manual_seed(0)
        model = GPT(n_layer=2, n_head=2, d_model=32, context=32)
        ddp = DDP(model, bucket_cap_mb=0.02)
        register_comm_hook(ddp, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(60):
            batch = random_batch(corpus.train, 8, 33, gen)
            logits = ddp(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = [float(model.loss(b)) for b in eval_batches(corpus.val, 16, 33, 4)]
        out[name] = sum(val) / len(val)
    return out


def test_a_short_training_run_with_each_hook_ends_near_plain_ddp():
    losses = run_ranks(_train, 2)[0]
    for name, loss in losses.items():
        assert loss <= losses["none"] * 1.05, (name, loss, losses["none"])
    assert losses["none"] < 3.3  # it did learn: bytes start near ln(256) = 5.5


RESUME = {
    "torch_powersgd": {"hook": "torch_powersgd", "rank": 2, "start_iter": 2},
    "lgreco-qsgd": {
        "hook": "lgreco",
        "compressor": "qsgd",
        "bits": 3,
        "bucket_size": 16,
        "start_iter": 2,
        "adjust_every": 3,
        "accumulate": 2,
    },
    "lgreco-powersgd": {
        "hook": "lgreco",
        "rank": 2,
        "start_iter": 2,
        "adjust_every": 3,
        "accumulate": 2,
    },
    "topk": {"hook": "topk", "density": 0.2, "start_iter": 1},
}


def _steps(ddp, opt, rank, steps):
    for step in steps:
        opt.zero_grad()
        _loss(ddp, _batch(rank, step)).backward()
        opt.step()


def _resume(rank, world):
    """Final parameters of 9 uninterrupted steps and of 4 + checkpoint + fresh objects + 5."""
    out = {}
    for name, cfg in RESUME.items():
        # torch's own hook aborts on gloo with several buckets (see benchmarks/comm.py)
        buckets = {"bucket_cap_mb": 25 if name.startswith("torch") else 0.002}
        _, _, ddp = _ddp(torch.float32, False, **buckets)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        straight_hook = register_comm_hook(ddp, cfg)
        _steps(ddp, opt, rank, range(9))
        straight = {k: v.clone() for k, v in ddp.module.state_dict().items()}

        _, _, ddp = _ddp(torch.float32, False, **buckets)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        hook = register_comm_hook(ddp, cfg)
        _steps(ddp, opt, rank, range(4))
        blob = io.BytesIO()
        torch.save(
            {"model": ddp.module.state_dict(), "opt": opt.state_dict(), "hook": hook.state_dict()},
            blob,
        )
        saved = torch.load(io.BytesIO(blob.getvalue()), weights_only=False)

        _, _, ddp = _ddp(torch.float32, False, **buckets)
        ddp.module.load_state_dict(saved["model"])
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        opt.load_state_dict(saved["opt"])
        hook = register_comm_hook(ddp, cfg)
        hook.load_state_dict(saved["hook"])
        _steps(ddp, opt, rank, range(4, 9))
        resumed = ddp.module.state_dict()
        out[name] = {
            "same": all(torch.equal(straight[k], resumed[k]) for k in straight),
            "keys": sorted(saved["hook"]),
            "step": getattr(hook.state, "step", None),
            "torch_iter": [getattr(h.state, "iter", None) for h in (straight_hook, hook)],
        }
    return out


def test_state_round_trips_and_a_resumed_run_matches_an_uninterrupted_one():
    for got in run_ranks(_resume, 2):
        for name, report in got.items():
            if name == "torch_powersgd":
                # torch's state is keyed by bucket index and laid out as the bucket was, so a
                # fresh DDP (not yet rebuilt buckets) cannot resume it bit-exactly; it must
                # restore and go on counting on the live process group.
                assert {"error_dict", "q_memory_dict", "iter"} <= set(report["keys"])
                assert report["torch_iter"][0] == report["torch_iter"][1] > 2
                continue
            assert report["same"], name
            assert report["step"] == 9
            assert {"errors", "levels", "step", "compressor"} <= set(report["keys"])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"hook": "lgreco", "compressor": "sgd"}, "comm.compressor='sgd'"),
        ({"hook": "powersgd", "rank": 0}, "comm.rank=0"),
        ({"hook": "lgreco", "rank": -2}, "comm.rank=-2"),
        ({"hook": "topk", "density": 1.5}, "comm.density=1.5"),
        ({"hook": "topk", "density": 0.0}, "comm.density=0.0"),
        ({"hook": "qsgd", "bits": 9}, "comm.bits=9"),
        ({"hook": "lgreco", "compressor": "qsgd", "bits": 1}, "comm.bits=1"),
        ({"hook": "lgreco", "alpha": 0.0}, "comm.alpha=0.0"),
        ({"hook": "lgreco", "alpha": -1.0}, "comm.alpha=-1.0"),
        ({"hook": "lgreco", "accumulate": 5, "adjust_every": 2}, "comm.accumulate=5"),
        ({"hook": "lgreco", "candidates": "2,x"}, "comm.candidates='2,x'"),
        ({"hook": "lgreco", "compressor": "topk", "candidates": "0.1,2"}, "comm.density=2.0"),
        ({"hook": "powersgd", "start_iter": -1}, "comm.start_iter=-1"),
        ({"hook": "powersgd", "rank": "four"}, "comm.rank='four'"),
        ({"hook": "powersgd", "ranks": 4}, "ranks"),
        ({"hook": "torch_powersgd", "start_iter": 1}, "comm.start_iter=1 must be >= 2"),
    ],
)
def test_bad_hook_settings_are_config_errors_naming_the_key(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        register_comm_hook(Net(), cfg)


def test_every_issue_hook_is_registered_and_the_anchors_stay():
    names = set(COMM_HOOKS.names())
    assert {"none", "fp16", "bf16", "powersgd", "topk", "qsgd", "lgreco"} <= names
    assert {"torch_fp16", "torch_powersgd"} <= names
    assert "gradlane.compressors" in COMM_HOOKS.get("powersgd")(Net())[1].__module__
    assert gradlane.register_comm_hook is register_comm_hook
