"""The compressors' tensor math against independent oracles, and their exchange on a
one-rank gloo group: lossless settings are exact, lossy ones conserve mass, the
bytes counted are the bytes formula, and bad input is refused with its key."""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradlane.compressors import (
    QSGD,
    Cast,
    Controller,
    GradientExchange,
    PowerSGD,
    Slot,
    TopK,
    orthogonalize,
    pack_bits,
    unpack_bits,
)
from gradlane.compressors.base import health, norms64
from gradlane.compressors.powersgd import REFINE_ITERATIONS
from gradlane.compressors.qsgd import dequantize, quantize
from gradlane.compressors.wire import pack, unpack


@pytest.fixture(scope="module")
def comm(one_rank_comm):
    return one_rank_comm


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip_and_size(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 1000):
        codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_bits(packed, n, bits), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_puts_each_code_where_the_layout_says(bits):
    """Bit k of packed byte j is bit j * 8 + k of the row, and bit b of code i sits at row
    bit i * bits + b (a brute-force oracle, rows of a 2-D batch packed alike)."""
    gen = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 2**bits, (3, 21), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    for row in range(3):
        stream = [(int(packed[row, j]) >> k) & 1 for j in range(packed.shape[1]) for k in range(8)]
        want = [(int(c) >> b) & 1 for c in codes[row] for b in range(bits)]
        assert stream[: len(want)] == want and not any(stream[len(want) :])


def test_payload_segments_round_trip_aligned():
    parts = [
        torch.randn(3),
        torch.arange(5, dtype=torch.int32),
        torch.tensor([7, 9], dtype=torch.uint8),
    ]
    payload, layout = pack(parts)
    assert payload.numel() == 12 + 20 + 4 and all(seg.offset % 4 == 0 for seg in layout)
    for want, got in zip(parts, unpack(payload, layout), strict=True):
        assert torch.equal(want, got)


def test_qsgd_rounds_a_layer_the_same_alone_or_batched():
    """Transports group layers differently (DDP buckets, an engine's one call): a layer's
    stochastic rounding depends on its own seed only."""
    rows = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    gen, seeds = torch.Generator(), [11, 22, 33]
    scales, codes = quantize(rows, 4, 64, gen, seeds)
    for j, seed in enumerate(seeds):
        alone = quantize(rows[j : j + 1], 4, 64, gen, [seed])
        torch.testing.assert_close(alone[0][0], scales[j], rtol=0, atol=0)
        assert torch.equal(alone[1][0], codes[j])
    other = quantize(rows, 4, 64, gen, [11, 22, 44])[1]
    assert torch.equal(other[:2], codes[:2]) and not torch.equal(other[2], codes[2])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_is_unbiased_bounded_and_its_expected_error_is_exact(bits):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(300, generator=gen) * torch.linspace(0.1, 3, 300)
    s, bucket = 2 ** (bits - 1) - 1, 64
    draws = 3000
    total, sq = torch.zeros_like(v), 0.0
    for _ in range(draws):
        scales, codes = quantize(v, bits, bucket, gen)
        assert codes.max() <= 2 * s
        vhat = dequantize(scales, codes, bits, bucket)
        step = torch.repeat_interleave(scales / s, bucket)[: v.numel()]
        assert ((vhat - v).abs() <= step * (1 + 1e-6)).all()  # one quantisation step at most
        total += vhat
        sq += float((vhat - v).square().sum())
    std = torch.repeat_interleave(scales / s, bucket)[: v.numel()] / 2  # >= per-entry std
    assert ((total / draws - v).abs() <= 5 * std / math.sqrt(draws) + 1e-7).all()
    expected = float(QSGD(bits, bucket).errors(v, [bits])[0])
    assert sq / draws == pytest.approx(expected, rel=0.05)


def _feedback(g: torch.Tensor, bits: int, e: torch.Tensor, steps: int, seed: int) -> list[float]:
    """||e||^2 after each of `steps` error-feedback steps of QSGD at `bits` on a fixed g."""
    gen, out = torch.Generator(), []
    for t in range(steps):
        m = g + e
        scales, codes = quantize(m.view(1, -1), bits, 128, gen.manual_seed(seed + t))
        e = m - dequantize(scales, codes, bits, 128).view(-1)
        out.append(float(e.double().square().sum()))
    return out


def test_qsgd_error_model_from_the_residual_predicts_each_widths_steady_state():
    """Oracle: error feedback run to its steady state at each width on a fixed heavy-tailed
    gradient (mean ||e||^2 over 30 steps after 10). The model, given M = g + e_4 with the
    4-bit steady residual, predicts G w / (1 - w) from its omega at every width: within 8%
    with the residual, where M's own omega misses 3 and 8 bits by more than 12%."""
    g = torch.randn(32768, generator=torch.Generator().manual_seed(0))
    g = g * torch.exp(torch.randn(32768, generator=torch.Generator().manual_seed(1)))
    e4 = torch.zeros_like(g)
    for t in range(20):
        scales, codes = quantize((g + e4).view(1, -1), 4, 128, torch.Generator().manual_seed(t))
        e4 = g + e4 - dequantize(scales, codes, 4, 128).view(-1)
    m, grad_sq, qsgd = g + e4, float(g.double().square().sum()), QSGD(4, 128)
    energy = float(m.double().square().sum())

    def predicted(omega: float) -> float:
        return grad_sq * omega / (1 - omega)

    for bits in (3, 4, 6, 8):
        steady = sum(_feedback(g, bits, torch.zeros_like(g), 40, 1000)[10:]) / 30
        with_residual = float(qsgd.errors(m, [bits], "w", e4)[0]) / energy
        alone = float(qsgd.errors(m, [bits])[0]) / energy
        assert predicted(with_residual) == pytest.approx(steady, rel=0.08), bits
        if bits in (3, 8):
            assert abs(predicted(alone) / steady - 1) > 0.12, bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_of_a_subnormal_bucket_stays_within_one_step(bits):
    """A bucket whose largest entry is subnormal (s / c would overflow to inf, 0 * inf is
    NaN): its zeros decode as 0 and every entry within one step c / s."""
    v = torch.zeros(2, 64)
    v[0, :3] = torch.tensor([1e-40, -3e-41, 5e-42])
    scales, codes = quantize(v, bits, 32, torch.Generator(), [1, 2])
    s = 2 ** (bits - 1) - 1
    assert codes.max() <= 2 * s
    vhat = dequantize(scales, codes, bits, 32)
    assert (vhat[0, 3:] == 0).all() and (vhat[1] == 0).all()
    assert ((vhat - v).abs() <= 1e-40 / s * (1 + 1e-6)).all()


def test_exchange_conserves_qsgd_at_mixed_levels_that_change_every_step(comm):
    """What L-GreCo QSGD does to the exchange: layers at 2, 3, 4, 6 and 8 bits at once
    (same-shape layers side by side at different widths), a level change on every step,
    gradients from 1e-40 (subnormal) to 1e3 and an all-zero one. At one rank the mean is
    the gradient itself: applied + e_new = g + e_old on every step, for every layer."""
    shapes = {f"w{i}": (16, 40) for i in range(5)} | {"b": (40,), "odd": (7, 9), "z": (5, 5)}
    model = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}
    )
    exchange = GradientExchange(model, QSGD(4, bucket_size=32), comm)
    gen = torch.Generator().manual_seed(0)
    widths = [2, 3, 4, 6, 8]
    for step in range(6):
        exchange.levels = {k: widths[(i + step) % 5] for i, k in enumerate(shapes)}
        grads = {
            k: torch.randn(s, generator=gen) * 10.0 ** (3 - 6 * i)
            for i, (k, s) in enumerate(shapes.items())
        }
        grads["z"].zero_()
        applied = {k: g.clone() for k, g in grads.items()}
        before = {k: e.clone() for k, e in exchange.errors.items()}
        exchange.average(list(shapes), list(applied.values()))
        for k, g in grads.items():
            old = before.get(k, torch.zeros_like(g))
            total = applied[k] + exchange.errors[k]
            scale = float((g + old).abs().max())
            torch.testing.assert_close(total, g + old, rtol=1e-5, atol=1e-6 * scale, msg=k)


def test_topk_errors_are_the_energy_left_out():
    a = torch.randn(7, 11, generator=torch.Generator().manual_seed(1))
    for density in (0.05, 0.3, 1.0):
        k = max(1, round(density * a.numel()))
        keep = a.abs().flatten().argsort(descending=True)[:k]
        residual = a.flatten().clone()
        residual[keep] = 0
        got = float(TopK(density).errors(a, [density])[0])
        assert got == pytest.approx(float(residual.double().square().sum()), rel=1e-9, abs=1e-12)


def test_powersgd_errors_are_what_the_steps_ahead_leave_behind(comm):
    """The predicted error at every rank equals the residual of really running that rank
    REFINE_ITERATIONS + 1 steps on the same M (one rank, so each output is P^ P^T M),
    from a cold start and from a warm Q; never below the best rank-r error."""
    import copy

    a = torch.randn(12, 3, 5, generator=torch.Generator().manual_seed(2))
    s_best = torch.linalg.svdvals(a.reshape(12, 15).double()).square()
    psgd = PowerSGD(4, min_compression_rate=0.0)
    for warm in (False, True):
        if warm:  # a step at rank 6 leaves a warm Q behind
            psgd.exchange([Slot("w", a.clone(), a.clone(), 6)], comm, torch.ones(1))
        levels = [1, 2, 4, 6, 9, 12]
        got = psgd.errors(a, levels, "w")
        for r, err in zip(levels, got, strict=True):
            assert float(err) >= float(s_best[r:].sum()) * (1 - 1e-6)
            step = copy.deepcopy(psgd)
            for _ in range(REFINE_ITERATIONS + 1):
                slot = Slot("w", a.clone(), a.clone(), r)
                step.exchange([slot], comm, torch.ones(1))
            residual = float(slot.m.double().square().sum())
            assert float(err) == pytest.approx(residual, rel=1e-4, abs=1e-6 * float(s_best.sum()))
        assert float(got[-1]) <= 1e-6 * float(s_best.sum())  # rank 12 = full rank: exact
    assert torch.equal(PowerSGD(4).errors(torch.randn(9), [2, 4]), torch.zeros(2).double())
    # 12 x 15 at rank 4 does not save 2x: sent as is, no error
    assert float(PowerSGD(4).errors(a, [4])[0]) == 0.0


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_orthogonalize_gives_orthonormal_columns_spanning_the_input(rank):
    p = torch.randn(40, rank, generator=torch.Generator().manual_seed(rank))
    original = p.clone()
    orthogonalize(p)
    assert torch.allclose(p.t() @ p, torch.eye(rank), atol=1e-5)
    assert torch.allclose(p @ (p.t() @ original), original, atol=1e-5)
    zero = torch.zeros(10, rank)
    orthogonalize(zero)
    assert torch.isfinite(zero).all()


def _slots(shapes, level, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    return [
        Slot(f"p{i}", g, g.to(torch.float32, copy=True), level, seed=i) for i, g in enumerate(grads)
    ]


def _healthy(slots):
    return torch.ones(len(slots))


def _id(x) -> str:
    return x.name if hasattr(x, "name") else str(x)


SHAPES = [(16, 8), (5,), (6, 2, 3), (40, 30)]
LOSSLESS = [
    (PowerSGD(64, min_compression_rate=0.0), 64),
    (TopK(1.0), 1.0),
    (QSGD(32), 32),
]
LOSSY = [
    (PowerSGD(2), 2),
    (PowerSGD(3), 3),
    (TopK(0.1), 0.1),
    (QSGD(2, bucket_size=16), 2),
    (QSGD(5, bucket_size=16), 5),
    (Cast("fp16"), 16),
    (Cast("bf16"), 16),
]


@pytest.mark.parametrize(("compressor", "level"), LOSSLESS, ids=_id)
def test_lossless_settings_send_the_gradient_itself(comm, compressor, level):
    slots = _slots(SHAPES, level)
    want = [s.m.clone() for s in slots]
    assert torch.equal(compressor.exchange(slots, comm, _healthy(slots)), _healthy(slots))
    for s, w in zip(slots, want, strict=True):  # PowerSGD: fp32 orthogonalisation rounds
        torch.testing.assert_close(s.grad, w, rtol=1e-4, atol=1e-4)
        assert s.m.abs().max() <= 1e-4 * w.abs().max()


@pytest.mark.parametrize(("compressor", "level"), LOSSY, ids=_id)
def test_lossy_exchange_conserves_mass_and_counts_its_bytes(comm, compressor, level):
    slots = _slots(SHAPES, level)
    want = [s.m.clone() for s in slots]
    sent = comm.payload
    compressor.exchange(slots, comm, _healthy(slots))
    for s, w in zip(slots, want, strict=True):  # applied + residual = M (one rank)
        torch.testing.assert_close(s.grad + s.m, w, rtol=1e-5, atol=1e-5)
    assert (torch.cat([s.m.flatten() for s in slots]) != 0).any()  # it really was lossy
    flag = 2 if isinstance(compressor, Cast) else 4  # one flag entry per layer
    formula = sum(compressor.wire_bytes(torch.Size(s), level) + flag for s in SHAPES)
    assert comm.payload - sent == formula


@pytest.mark.parametrize(("compressor", "level"), LOSSLESS + LOSSY, ids=_id)
def test_flags_poison_a_non_finite_layer_and_zero_an_unused_one(comm, compressor, level):
    slots = _slots(SHAPES, level)
    want = [s.m.clone() for s in slots]
    flags = torch.tensor([1.0, torch.inf, 0.0, 1.0])
    got = compressor.exchange(slots, comm, flags)
    assert torch.equal(got, flags)  # one rank: the sum is its own flags
    assert slots[1].grad.isnan().all()  # not finite somewhere: nan everywhere, as inf would
    assert not slots[2].grad.any()  # nobody used it: no update
    for s, w in (slots[0], want[0]), (slots[3], want[3]):  # the others go on as usual
        torch.testing.assert_close(s.grad + s.m, w, rtol=1e-5, atol=1e-5)


def test_a_cast_that_overflows_counts_as_not_finite(comm):
    slots = _slots([(4, 4), (3,)], 16)
    slots[0].m[0, 0] = 1e6  # beyond fp16's range
    total = Cast("fp16").exchange(slots, comm, _healthy(slots))
    assert total.tolist() == [math.inf, 1.0] and slots[0].grad.isnan().all()
    slots = _slots([(4, 4)], 16)
    slots[0].m[0, 0] = 1e6  # bf16 has fp32's range
    assert torch.equal(Cast("bf16").exchange(slots, comm, _healthy(slots)), _healthy(slots))


def _contiguous(slots):
    """The same slots with every m a view into one buffer, back to back (as the exchange
    lays them out), so same-shape layers run as one batch."""
    flat = torch.cat([s.m.flatten() for s in slots])
    out, offset = [], 0
    for s in slots:
        m = flat[offset : offset + s.m.numel()].view_as(s.m)
        offset += s.m.numel()
        out.append(Slot(s.name, torch.empty_like(s.grad), m, s.level, s.seed))
    return out


@pytest.mark.parametrize(
    ("compressor", "level"), [(PowerSGD(2), 2), (PowerSGD(4), 4), (TopK(0.2), 0.2)], ids=_id
)
def test_batched_same_shape_layers_match_one_by_one(comm, compressor, level):
    shapes = [(16, 8), (16, 8), (16, 8), (5,), (30, 20), (30, 20)]
    alone = _slots(shapes, level)
    together = _contiguous(alone)
    compressor.exchange(alone, comm, _healthy(alone))
    compressor.load_state_dict({"q": {}})  # PowerSGD: both start from the same fresh Q
    compressor.exchange(together, comm, _healthy(together))
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.m, b.m, rtol=1e-4, atol=1e-5)


def test_batched_qsgd_conserves_mass_and_counts_its_bytes(comm):
    qsgd, shapes = QSGD(3, bucket_size=16), [(7, 5), (7, 5), (7, 5), (64,), (64,)]
    slots = _contiguous(_slots(shapes, 3))
    want = [s.m.clone() for s in slots]
    sent = comm.payload
    qsgd.exchange(slots, comm, _healthy(slots))
    for s, w in zip(slots, want, strict=True):
        torch.testing.assert_close(s.grad + s.m, w, rtol=1e-5, atol=1e-5)
    assert comm.payload - sent == sum(qsgd.wire_bytes(torch.Size(s), 3) + 4 for s in shapes)


def test_fp16_gradients_come_back_in_fp16(comm):
    slots = _slots(SHAPES, 1.0, dtype=torch.float16)
    want = [s.m.clone() for s in slots]
    TopK(1.0).exchange(slots, comm, _healthy(slots))
    for s, w in zip(slots, want, strict=True):
        assert s.grad.dtype == torch.float16 and torch.equal(s.grad, w.half())


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: PowerSGD(0), "rank=0"),
        (lambda: PowerSGD(2.5), "rank=2.5"),
        (lambda: PowerSGD(4, min_compression_rate=-1), "min_compression_rate=-1"),
        (lambda: TopK(0.0), "density=0.0"),
        (lambda: TopK(1.5), "density=1.5"),
        (lambda: QSGD(1), "bits=1"),
        (lambda: QSGD(9), "bits=9"),
        (lambda: QSGD(16), "bits=16"),
        (lambda: QSGD(4, bucket_size=0), "bucket_size=0"),
        (lambda: Cast("fp8"), "dtype='fp8'"),
        (lambda: Controller(PowerSGD(4), alpha=0), "alpha=0"),
        (lambda: Controller(PowerSGD(4), alpha=-1.0), "alpha=-1.0"),
        (lambda: Controller(PowerSGD(4), adjust_every=0), "adjust_every=0"),
        (lambda: Controller(PowerSGD(4), accumulate=5, adjust_every=2), "accumulate=5"),
        (lambda: Controller(PowerSGD(4), start_iter=-1), "start_iter=-1"),
        (lambda: Controller(PowerSGD(4), bins=0), "bins=0"),
        (lambda: Controller(QSGD(4), candidates=[2, 9]), "bits=9"),
    ],
)
def test_bad_settings_raise_a_value_error_naming_key_and_value(make, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        make()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradient_norms_match_float64_from_subnormal_to_past_fp32_squares(dtype):
    """The exchange's gradient norms (fp32 kernel plus float64 retakes on the CPU) against
    a float64 oracle: entries from 1e-40 (their fp32 squares underflow to 0) to 1e25
    (their squares overflow), an all-zero and a non-finite gradient; so `health` flags
    exactly the zero one unused and the inf / nan ones poisoned."""
    gen = torch.Generator().manual_seed(3)
    scales = [1e-40, 1e-25, 1e-3, 1.0, 1e3, 1e25] if dtype == torch.float32 else [1e-6, 1.0]
    grads = [(torch.randn(33, 7, generator=gen) * s).to(dtype) for s in scales]
    grads += [torch.zeros(5, dtype=dtype), torch.full((4,), math.inf, dtype=dtype)]
    grads += [torch.tensor([1.0, math.nan], dtype=dtype)]
    got = torch.stack(norms64(grads))
    want = torch.stack([g.double().square().sum().sqrt() for g in grads])
    assert got.dtype == torch.float64
    n = len(scales)
    torch.testing.assert_close(got[:n], want[:n], rtol=1e-5, atol=0.0)
    assert (got[:n] > 0).all() and float(got[n]) == 0.0
    assert math.isinf(float(got[n + 1])) and math.isnan(float(got[n + 2]))
    flags = health(got).tolist()
    assert flags == [1.0] * n + [0.0, math.inf, math.inf]
