"""EvoNorm-B0/S0 against timm's EvoNorm2dB0/S0 (test-only oracle), gradcheck, any rank,
half precision, TorchScript, torch.compile; and `convert_norms` on Sequential, torchvision-
and timm-style ResNets."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from gradlane.layers import IMPLS, EvoNormB0, EvoNormS0, convert_norms, evonorm

CL = torch.channels_last


def load_timm(module: str):
    """Import a timm submodule without running timm's package __init__.

    `import timm` imports torchvision, which cannot be installed beside the CPU
    torch build. timm's layers and models only need it for one class
    (FrozenBatchNorm2d), so: register empty namespace packages for `timm`,
    `timm.models` and `timm.data` (the latter holding only its constants) that
    point at the installed directory, give the import a placeholder
    `torchvision.ops.misc` module, and remove that placeholder right after, so
    nothing else in the test session sees a fake torchvision.
    """
    spec = importlib.util.find_spec("timm") if "timm" not in sys.modules else None
    if spec is None and "timm" not in sys.modules:
        pytest.skip("timm is not installed")
    root = spec.submodule_search_locations[0] if spec else sys.modules["timm"].__path__[0]

    def package(name: str, path: str, **attrs) -> types.ModuleType:
        mod = sys.modules.get(name) or types.ModuleType(name)
        mod.__path__ = [path]
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    package("timm", root, __version__=importlib.metadata.version("timm"))
    package("timm.models", f"{root}/models")
    data = package("timm.data", f"{root}/data")
    constants = importlib.import_module("timm.data.constants")
    data.__dict__.update({k: v for k, v in vars(constants).items() if k.isupper()})
    fake = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {k: sys.modules[k] for k in fake if k in sys.modules}
    for name in fake:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type(
        "FrozenBatchNorm2d", (nn.Module,), {}
    )
    try:
        return importlib.import_module(module)
    finally:
        for name in fake:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def timm_evo():
    return load_timm("timm.layers.evo_norm")


# ---- an independent formula, for ranks timm does not cover ------------------------------------


def ref_b0(x, v, w, b, var_run, eps, training):
    xs = x if x.dim() > 2 else x[..., None]
    dims = tuple(range(2, xs.dim()))
    shape = (1, -1) + (1,) * len(dims)
    var_i = xs.var(dims, unbiased=False, keepdim=True)
    var_b = xs.var((0, *dims), unbiased=False, keepdim=True) if training else var_run.view(shape)
    d = torch.maximum((var_b + eps).sqrt(), v.view(shape) * xs + (var_i + eps).sqrt())
    return (xs / d * w.view(shape) + b.view(shape)).view_as(x)


def ref_s0(x, v, w, b, groups, eps):
    xs = x if x.dim() > 2 else x[..., None]
    n, c = xs.shape[:2]
    shape = (1, -1) + (1,) * (xs.dim() - 2)
    std = (xs.reshape(n, groups, -1).var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    std = std.expand(n, groups, xs[0].numel() // groups).reshape(xs.shape)
    y = xs * torch.sigmoid(v.view(shape) * xs) / std
    return (y * w.view(shape) + b.view(shape)).view_as(x)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
    return module


def grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in module.named_parameters()}


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- EvoNorm against timm -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_matches_timm_train_and_eval(timm_evo, kind, layout):
    if kind == "b0":
        ours, ref = EvoNormB0(16), timm_evo.EvoNorm2dB0(16)
    else:
        ours, ref = EvoNormS0(16, groups=4), timm_evo.EvoNorm2dS0(16, groups=4)
    randomize(ref)
    ours.load_state_dict(ref.state_dict())  # the same parameter and buffer names
    gen = torch.Generator().manual_seed(1)
    for mode in ("train", "train", "eval", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(4, 16, 7, 9, generator=gen) * 2 + 1
        if layout == "channels_last":
            x = x.contiguous(memory_format=CL)
        g = torch.randn(x.shape, generator=gen)
        y1, dx1, dp1 = grads(ours, x, g)
        y2, dx2, dp2 = grads(ref, x, g)
        close(y1, y2)
        close(dx1, dx2)
        for name in dp2:
            close(dp1[name], dp2[name], 1e-4 if name == "v" else 1e-5)
        if kind == "b0":  # same momentum update with the unbiased n / (n - 1) factor as timm
            close(ours.running_var, ref.running_var)
        if layout == "channels_last":
            assert y1.is_contiguous(memory_format=CL) and dx1.is_contiguous(memory_format=CL)


# ---- gradients, ranks, precision ------------------------------------------------------------


SHAPES = [(5, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s) - 2}d")
@pytest.mark.parametrize("case", ["b0-train", "b0-eval", "s0"])
def test_gradcheck_fp64(case, shape):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    c = shape[1]
    v, w, b = (
        (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_() for _ in range(3)
    )
    if case == "s0":

        def fn(x, v, w, b):
            return torch.ops.gradlane.evonorm_s0(x, v, w, b, 2, 1e-5)[0]
    else:
        running = torch.rand(c, generator=g, dtype=torch.float64) + 0.5

        def fn(x, v, w, b):
            out = torch.ops.gradlane.evonorm_b0(x, v, w, b, running, 1e-3, case == "b0-train")
            return out[0]

    assert torch.autograd.gradcheck(fn, (x, v, w, b))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s) - 2}d")
@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_any_rank_matches_formula(kind, shape):
    c = shape[1]
    layer = randomize(EvoNormB0(c) if kind == "b0" else EvoNormS0(c, groups=2), seed=3)
    gen = torch.Generator().manual_seed(4)
    for training in (True, False):
        layer.train(training)
        x = torch.randn(shape, generator=gen) * 3 - 1
        g = torch.randn(shape, generator=gen)
        running = layer.running_var.clone() if kind == "b0" else None
        y, dx, dp = grads(layer, x, g)
        xr = x.clone().requires_grad_()
        params = {k: p.detach().clone().requires_grad_() for k, p in layer.named_parameters()}
        if kind == "b0":
            yr = ref_b0(xr, params["v"], params["weight"], params["bias"], running, 1e-3, training)
        else:
            yr = ref_s0(xr, params["v"], params["weight"], params["bias"], 2, 1e-5)
        yr.backward(g)
        close(y, yr.detach())
        close(dx, xr.grad)
        for k, p in params.items():
            close(dp[k], p.grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_half_inputs_keep_fp32_statistics(kind, dtype):
    # values near 300 over 64x64 positions: sums of squares reach 4e8, far past fp16's 65504,
    # so statistics accumulated in the input dtype would overflow
    layer = EvoNormB0(8) if kind == "b0" else EvoNormS0(8, groups=2)
    x = (torch.randn(2, 8, 64, 64, generator=torch.Generator().manual_seed(5)) * 30 + 300).to(dtype)
    xh = x.clone().requires_grad_()
    y = layer(xh)
    y.float().sum().backward()
    assert y.dtype == dtype and xh.grad.dtype == dtype and layer.weight.grad.dtype == torch.float32
    expected = layer(x.float())
    assert torch.isfinite(y).all() and torch.isfinite(xh.grad).all()
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


def test_forward_saves_only_the_input_for_backward(timm_evo):
    """The memory claim as an invariant: saved full-size tensors are x alone (timm saves more)."""

    def saved_elements(layer: nn.Module) -> int:
        x = torch.randn(4, 16, 8, 8, requires_grad=True)
        big = []

        def pack(t):
            if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr():
                big.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(big)

    assert saved_elements(EvoNormB0(16)) == 0
    assert saved_elements(EvoNormS0(16, groups=4)) == 0
    assert saved_elements(timm_evo.EvoNorm2dB0(16)) >= 2 * 4 * 16 * 8 * 8
    assert saved_elements(timm_evo.EvoNorm2dS0(16, groups=4)) >= 2 * 4 * 16 * 8 * 8


@pytest.mark.parametrize("apply_act", [True, False])
def test_torchscript_matches_eager(apply_act):
    for make in (
        lambda: EvoNormB0(8, apply_act=apply_act),
        lambda: EvoNormS0(8, 2, None, apply_act),
    ):
        eager, scripted = randomize(make()), torch.jit.script(randomize(make()))
        for training in (True, True, False):
            eager.train(training)
            scripted.train(training)
            x = torch.randn(3, 8, 5, 5)
            close(scripted(x), eager(x))
        if isinstance(eager, EvoNormB0):
            close(scripted.running_var, eager.running_var)
        x = torch.randn(3, 8, 5, 5, requires_grad=True)
        scripted(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_compile_of_a_whole_model_has_no_graph_break_and_matches_eager():
    # fullgraph=True: a graph break would raise. The S0 layer's own body is compiled too.
    eager = nn.Sequential(EvoNormB0(8), nn.Conv2d(8, 8, 1), EvoNormS0(8, groups=4, impl="compiled"))
    compiled = torch.compile(eager, fullgraph=True)
    x = torch.randn(4, 8, 6, 6)
    g = torch.randn(4, 8, 6, 6)
    y1, dx1, dp1 = grads(compiled, x, g)
    y2, dx2, dp2 = grads(eager, x, g)
    close(y1, y2)
    close(dx1, dx2)
    for k in dp2:
        close(dp1[f"_orig_mod.{k}"], dp2[k], 1e-4)  # compile wraps the same parameters


@pytest.mark.parametrize("op", ["evonorm_b0", "evonorm_s0"])
def test_custom_op_registration_is_consistent(op):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration."""
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [torch.rand(4, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(3)]
    if op == "evonorm_b0":
        args = (x, *params, torch.ones(4, dtype=torch.float64), 1e-3, True)
    else:
        args = (x, *params, 2, 1e-5)
    torch.library.opcheck(getattr(torch.ops.gradlane, op).default, args)


def test_apply_act_false_is_the_affine_part():
    x = torch.randn(3, 6, 4)
    for layer in (EvoNormB0(6, apply_act=False), EvoNormS0(6, 3, apply_act=False)):
        randomize(layer)
        assert layer.v is None
        close(layer(x), x * layer.weight[:, None] + layer.bias[:, None])


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match=r"input shape \(2, 5, 3\) is not \(N, 4"):
        EvoNormB0(4)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"input shape \(4,\)"):
        EvoNormS0(4, groups=2)(torch.randn(4))
    with pytest.raises(ValueError, match="num_features=6 is not divisible into groups=4"):
        EvoNormS0(6, groups=4)
    with pytest.raises(ValueError, match="momentum=1.5"):
        EvoNormB0(4, momentum=1.5)
    with pytest.raises(ValueError, match="norm='evonorm_x'"):
        evonorm("evonorm_x", 4)


# ---- convert_norms --------------------------------------------------------------------------


def conv_bn(c: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
    )


@pytest.mark.parametrize("target", ["evonorm_b0", "evonorm_s0"])
def test_convert_sequential_in_place(target):
    model = conv_bn()
    for bn in (model[1], model[4]):
        randomize(bn, seed=6)
        bn.running_var.uniform_(0.5, 2.0)
    old_bn1 = model[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert_norms(model, target, without_act="affine")
    assert out is model
    cls = EvoNormB0 if target == "evonorm_b0" else EvoNormS0
    assert isinstance(model[1], cls) and model[1].apply_act
    assert isinstance(model[2], nn.Identity)
    assert isinstance(model[4], cls) and not model[4].apply_act
    close(model[1].weight, old_bn1.weight)
    if target == "evonorm_b0":
        close(model[1].running_var, old_bn1.running_var)
    if target == "evonorm_s0":
        assert model[1].groups == 8  # gcd(8, 32)

    x = torch.randn(4, 3, 6, 6)
    h = model[0](x)
    n1 = model[1]
    if target == "evonorm_b0":
        h = ref_b0(h, n1.v, n1.weight, n1.bias, n1.running_var, n1.eps, True)
    else:
        h = ref_s0(h, n1.v, n1.weight, n1.bias, n1.groups, n1.eps)
    n2 = model[4]
    expected = model[3](h) * n2.weight.view(1, -1, 1, 1) + n2.bias.view(1, -1, 1, 1)
    close(model(x), expected)


class SharedReluBlock(nn.Module):
    """torchvision's BasicBlock layout: one ReLU module called after bn1 and after the add."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


def test_convert_shared_relu_rewrites_the_graph():
    block = SharedReluBlock()
    out = convert_norms(block, "evonorm_s0", without_act="affine")
    assert isinstance(out, fx.GraphModule)
    assert isinstance(block.bn1, nn.BatchNorm2d)  # the original is left as it was
    assert isinstance(out.bn1, EvoNormS0) and out.bn1.apply_act
    assert isinstance(out.bn2, EvoNormS0) and not out.bn2.apply_act
    relus = [n for n in out.graph.nodes if n.op == "call_module" and n.target == "relu"]
    assert len(relus) == 1  # the ReLU after the residual add stays
    x = torch.randn(2, 8, 5, 5)
    h = ref_s0(out.conv1(x), out.bn1.v, out.bn1.weight, out.bn1.bias, 8, 1e-5)
    expected = torch.relu(out.conv2(h) * out.bn2.weight.view(1, -1, 1, 1) + x)
    close(out(x), expected)


def test_convert_functional_relu():
    out = convert_norms(FunctionalRelu(), "evonorm_b0")
    assert isinstance(out, fx.GraphModule) and isinstance(out.bn, EvoNormB0) and out.bn.apply_act
    assert not any(n.op == "call_function" and n.target is F.relu for n in out.graph.nodes)
    x = torch.randn(4, 3, 3, 3)
    b = out.bn
    expected = ref_b0(out.conv(x), b.v, b.weight, b.bias, b.running_var, b.eps, True).mean((2, 3))
    close(out(x), expected)


class Unconvertible(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_silu = nn.BatchNorm2d(4)
        self.act = nn.SiLU()
        self.bn_twice = nn.BatchNorm2d(4)
        self.bn_unused = nn.BatchNorm1d(3)
        self.bn_ok = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.act(self.bn_silu(x)) + self.bn_twice(x) + self.bn_twice(x) + self.bn_ok(x)


def test_unconvertible_layers_are_reported():
    model = Unconvertible()
    with pytest.warns(UserWarning, match="left 3 BatchNorm") as record:
        out = convert_norms(model, "evonorm_b0", without_act="affine")
    msg = str(record[0].message)
    assert "bn_silu (followed by SiLU" in msg
    assert "bn_twice (called 2 times" in msg
    assert "bn_unused (not reached)" in msg
    assert isinstance(out.bn_ok, EvoNormB0) and isinstance(out.bn_silu, nn.BatchNorm2d)

    strict = Unconvertible()
    with pytest.raises(ValueError, match="cannot convert 3 layer"):
        convert_norms(strict, "evonorm_b0", strict=True)
    assert isinstance(strict.bn_ok, nn.BatchNorm2d)  # nothing changed before the error


def test_convert_bad_target_and_untraceable_model():
    with pytest.raises(ValueError, match="target='groupnorm' is not a conversion target"):
        convert_norms(conv_bn(), "groupnorm")

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="DataDependent cannot be traced"):
        convert_norms(DataDependent(), "evonorm_s0")


@pytest.mark.parametrize("target", ["evonorm_b0", "evonorm_s0"])
def test_convert_timm_resnet(target):
    resnet = load_timm("timm.models.resnet")
    model = resnet.resnet18(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert_norms(model, target, without_act="affine")
    assert out is model  # timm's blocks have one ReLU module per call site: swapped in place
    norms = [m for m in model.modules() if isinstance(m, (EvoNormB0, EvoNormS0))]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(m.apply_act for m in norms) == 9  # stem + bn1 of 8 blocks
    assert sum(not m.apply_act for m in norms) == 11  # bn2 of 8 blocks + 3 downsample norms
    for block in (*model.layer1, *model.layer4):
        assert isinstance(block.act1, nn.Identity) and isinstance(block.act2, nn.ReLU)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- numerics, impls, BatchNorm conversion choices ---------------------------------------


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_large_offsets_keep_full_precision_against_fp64(kind, offset):
    # one-pass E[x^2] - E[x]^2 in fp32 cancels here (the S0 output was off by 100x)
    layer = randomize(EvoNormB0(16) if kind == "b0" else EvoNormS0(16, groups=4))
    ref = randomize(EvoNormB0(16) if kind == "b0" else EvoNormS0(16, groups=4)).double()
    x = torch.randn(4, 16, 12, 12, generator=torch.Generator().manual_seed(3)) * 0.5 + offset
    for training in (True, False):
        layer.train(training)
        ref.train(training)
        if not training and kind == "b0":
            ref.running_var.copy_(layer.running_var)
        y, want = layer(x), ref(x.double())
        err = ((y.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (training, err)


@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_compiled_impl_matches_eager(kind):
    layers = [
        randomize(EvoNormB0(8, impl=impl) if kind == "b0" else EvoNormS0(8, 4, impl=impl))
        for impl in ("eager", "compiled")
    ]
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=CL)
    g = torch.randn(4, 8, 6, 6)
    (y1, dx1, dp1), (y2, dx2, dp2) = (grads(layer, x, g) for layer in layers)
    assert y2.stride() == x.stride()  # what the op's fake implementation promises
    close(y2, y1)
    close(dx2, dx1, 1e-4)
    for k in dp1:
        close(dp2[k], dp1[k], 1e-4)
    with pytest.raises(ValueError, match="impl='triton' is not one of eager, compiled"):
        EvoNormB0(8, impl="triton")


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["b0", "s0"])
def test_every_impl_matches_fp64_at_an_offset(kind, dtype, device):
    """Output and gradients (input and parameters) of each impl against an fp64 copy of
    the layer fed the same dtype-rounded values, as a normwise relative error. fp32 at an
    offset of 100 (mean >> std); bf16 at 3: its input gradient at 100 is off by ~0.3, the
    bf16 backward's known limit (its terms cancel in 8 bits of mantissa)."""
    offset, tol = (100.0, 1e-4) if dtype == torch.float32 else (3.0, 3e-2)
    x = (torch.randn(4, 32, 10, 10) * 0.5 + offset).to(dtype)
    g = torch.randn(4, 32, 10, 10).to(dtype)
    ref = randomize(EvoNormB0(32) if kind == "b0" else EvoNormS0(32, 8)).double()
    want = grads(ref, x.double(), g.double())
    for impl in IMPLS:
        layer = randomize(EvoNormB0(32, impl=impl) if kind == "b0" else EvoNormS0(32, 8, impl=impl))
        got = grads(layer.to(device), x.to(device), g.to(device))
        pairs = [*zip(got[:2], want[:2], strict=True), *((got[2][k], want[2][k]) for k in want[2])]
        for a, b in pairs:
            err = ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
            assert err < tol, (impl, err)


def test_batchnorm_without_activation_choices():
    class Head(nn.Module):  # BN -> Linear and BN -> MaxPool -> ReLU, beside one BN -> ReLU
        def __init__(self):
            super().__init__()
            self.bn_relu, self.bn_pool, self.bn_fc = (
                nn.BatchNorm2d(4),
                nn.BatchNorm2d(4),
                nn.BatchNorm1d(4),
            )
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.bn_relu(x))
            x = torch.relu(F.max_pool2d(self.bn_pool(x), 2))
            return self.fc(self.bn_fc(x.mean((2, 3))))

    with pytest.warns(
        UserWarning, match="2 BatchNorm layer.* not followed by an activation"
    ) as rec:
        out = convert_norms(Head(), "evonorm_s0")
    assert "bn_pool, bn_fc; pass without_act='affine'" in str(rec[0].message)
    assert isinstance(out.bn_fc, EvoNormS0) and not out.bn_fc.apply_act
    kept = convert_norms(Head(), "evonorm_s0", without_act="keep")
    assert isinstance(kept.bn_pool, nn.BatchNorm2d) and isinstance(kept.bn_fc, nn.BatchNorm1d)
    assert isinstance(kept.bn_relu, EvoNormS0) and kept.bn_relu.apply_act
    head = Head()
    with pytest.raises(ValueError, match="not followed by an activation: bn_pool, bn_fc"):
        convert_norms(head, "evonorm_b0", without_act="error")
    assert isinstance(head.bn_relu, nn.BatchNorm2d)  # nothing changed before the error
    with pytest.raises(ValueError, match="without_act='drop' is not allowed"):
        convert_norms(Head(), "evonorm_b0", without_act="drop")


def test_cumulative_batchnorm_becomes_a_cumulative_evonorm_b0():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    model(torch.randn(2, 3, 5, 5))  # one batch tracked
    out = convert_norms(model, "evonorm_b0")
    layer = out[1]
    assert layer.momentum is None and int(layer.num_batches_tracked) == 1
    start = layer.running_var.clone()
    xs = [torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    unbiased = []
    for x in xs:
        h = out[0](x)
        unbiased.append(h.detach().var((0, 2, 3), correction=1))
        out(x)
    # the mean over every batch seen, the one before conversion included: no momentum 0.1
    torch.testing.assert_close(layer.running_var, (start + sum(unbiased)) / 4)
    assert int(layer.num_batches_tracked) == 4
