"""EvoNorm-B0 and EvoNorm-S0 normalization-activation layers, and `convert_norms`.

Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020:

    B0:  y = x / max(sqrt(s_b^2 + eps), v * x + sqrt(s_i^2 + eps)) * gamma + beta
    S0:  y = x * sigmoid(v * x) / sqrt(s_g^2 + eps) * gamma + beta

s_b^2 is the per-channel batch variance (a running estimate in eval), s_i^2 the
per-sample, per-channel (instance) variance over the spatial dimensions, s_g^2
the per-sample group variance. S0 uses no batch statistics: no SyncBatchNorm
traffic and no collapse at small per-GPU batches. With `apply_act=False` both
reduce to the affine part, as in the reference TPU implementation and timm.

Each layer is one custom op (`torch.ops.gradlane.evonorm_b0` / `evonorm_s0`) with
a hand-written backward: the forward saves only x and per-(sample, channel)
statistics and the backward recomputes the elementwise terms in place, so
autograd keeps about a third of what the composed torch ops keep and allocates
few full-size buffers. Statistics are two-pass (mean, then the mean of (x - mean)^2)
in fp32 or wider (also for fp16 / bf16 inputs), combined across samples or channels
exactly (Chan et al.: the variance of the union is the mean of the variances plus the
variance of the means), so a large offset (mean^2 >> var) costs no precision. Being
custom ops, the layers also run under TorchScript and `torch.compile` of a whole model
(no graph break).

`impl` picks how the op's body runs: "eager" (PyTorch operations, a few full-size
passes each) or "compiled" (the same forward and backward bodies compiled by
`torch.compile`: inductor fuses them into a few loops, Triton kernels on a GPU; the
first call per shape compiles). `impl=None` takes, when the layer is built,
CUDA_DEFAULT_IMPL for CUDA inputs and "eager" for the others.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import is_fx_tracing
from torch.nn.modules.batchnorm import _BatchNorm


def _acc(x: Tensor) -> torch.dtype:
    """The statistics dtype: fp32 for half inputs, the input's own dtype otherwise."""
    return torch.promote_types(x.dtype, torch.float32)


def _spatial(x: Tensor) -> Tensor:
    """(N, C) inputs as (N, C, 1), so that there is always a spatial dimension to reduce."""
    return x.unsqueeze(-1) if x.dim() == 2 else x


def _count(x: Tensor) -> int:
    """Elements per (sample, channel)."""
    return math.prod(x.shape[2:])


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.sum(dims, keepdim=True, dtype=_acc(t))


def _channel(p: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector as (1, C, 1, ...) in x's dtype."""
    return p.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))


def _instance_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (fp64) and biased variance (>= fp32) per (sample, channel) over the spatial dims.

    Two passes: the mean, summed in fp64, then the variance as the mean of (x - c)^2
    about c, the mean rounded to the statistics dtype, corrected by (mean - c)^2. The
    one-pass E[x^2] - E[x]^2 loses every digit of a variance 1e-6 of mean^2 in fp32; here
    the error is about 1e-7 of the variance whatever the offset, and the fp64 mean keeps
    the differences of means accurate when samples or channels are combined.
    """
    dims, count = _dims(x), _count(x)
    xf = x.to(_acc(x))
    mean = xf.sum(dims, keepdim=True, dtype=torch.float64) / count
    c = mean.to(xf.dtype)
    centered = xf.sub_(c) if xf is not x else xf - c
    var = torch.linalg.vector_norm(centered, 2, dims, keepdim=True).square_() / count
    return mean, var - (mean - c).square().to(var.dtype)


IMPLS = ("eager", "compiled")
# the impl of a layer with impl=None on a CUDA input ("eager" elsewhere): on an H100,
# `benchmarks/evonorm.py --device cuda` measured it 1.5-1.8x faster than eager everywhere.
CUDA_DEFAULT_IMPL = "compiled"
_COMPILED: dict = {}


def _body(fn, impl: str):
    """`fn` itself, or (impl "compiled") `fn` compiled by torch.compile, built on first use.

    Inside an outer torch.compile trace (dynamo, or the FX trace of the op's backward that
    AOTAutograd makes) the plain body is traced into the outer graph.
    """
    if impl == "eager" or torch.compiler.is_compiling() or is_fx_tracing():
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


def _check_impl(impl: str | None, what: str) -> None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"{what}: impl={impl!r} is not one of {', '.join(IMPLS)} (or None)")


def _strided_like(y: Tensor, x: Tensor) -> Tensor:
    """y with x's strides (what the fake implementation promises): a compiled body may lay
    its output out otherwise."""
    return y if y.stride() == x.stride() else torch.empty_like(x).copy_(y)


def _check(x: Tensor, num_features: int, what: str) -> None:
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{what}: input shape {tuple(x.shape)} is not (N, {num_features}, ...) "
            f"(num_features={num_features})"
        )


# ---- EvoNorm-B0 -------------------------------------------------------------------------------


def _b0_forward(x, v, weight, bias, running_var, eps: float, training: bool):
    xs = _spatial(x)
    mean_i, var_i = _instance_moments(xs)
    if training:  # Chan et al.: mean of the variances plus variance of the means
        mean_b = mean_i.mean(0, keepdim=True)
        spread = (mean_i - mean_b).square().mean(0, keepdim=True)
        var_b = var_i.mean(0, keepdim=True) + spread.to(var_i.dtype)
    else:
        var_b = running_var.to(var_i.dtype).view_as(var_i[:1])
    mean_i = mean_i.to(var_i.dtype)
    y = torch.addcmul((var_i + eps).sqrt_().to(x.dtype), xs, _channel(v, xs))  # v x + s_i
    y.clamp_(min=(var_b + eps).sqrt().to(x.dtype))  # max(s_b, v x + s_i)
    if torch.compiler.is_compiling():  # dynamo has no out= on channels-last tensors
        y = torch.addcmul(_channel(bias, xs), xs, _channel(weight, xs) / y)
    else:  # eager: in place, one pass each
        torch.div(_channel(weight, xs), y, out=y)
        torch.addcmul(_channel(bias, xs), xs, y, out=y)
    return y.view_as(x), mean_i, var_i, var_b.view(-1).clone()


@torch.library.custom_op("gradlane::evonorm_b0", mutates_args=())
def evonorm_b0(
    x: Tensor,
    v: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_var: Tensor,
    eps: float,
    training: bool,
    impl: str = "eager",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-B0 forward: (y, instance mean, instance var, batch var), stats in >= fp32."""
    _check(x, weight.numel(), "EvoNormB0")
    y, *stats = _body(_b0_forward, impl)(x, v, weight, bias, running_var, eps, training)
    return _strided_like(y, x), *stats


@evonorm_b0.register_fake
def _(x, v, weight, bias, running_var, eps, training, impl="eager"):
    stats = x.new_empty(_spatial(x).shape[:2] + (1,) * max(1, x.dim() - 2), dtype=_acc(x))
    return torch.empty_like(x), stats, torch.empty_like(stats), stats.new_empty(x.shape[1])


def _b0_setup(ctx, inputs, output) -> None:
    x, v, weight, _, running_var, eps, training, *impl = inputs
    _, mean_i, var_i, var_b = output
    ctx.mark_non_differentiable(mean_i, var_i, var_b)
    ctx.eps, ctx.training, ctx.impl = eps, training, impl[0] if impl else "eager"
    ctx.save_for_backward(x, v, weight, mean_i, var_i, var_b)


def _b0_backward(ctx, grad, *_):
    x, v, weight, mean_i, var_i, var_b = ctx.saved_tensors
    body = _body(_b0_grads, ctx.impl)
    grads = body(grad, x, v, weight, mean_i, var_i, var_b, ctx.eps, ctx.training)
    return (*grads, None, None, None, None)


def _b0_grads(grad, x, v, weight, mean_i, var_i, var_b, eps: float, training: bool):
    """Gradients of B0 (x, v, gamma, beta), recomputing d = max(s_b, v x + s_i) from x.

    With q = -gamma g x / d^2 (the gradient w.r.t. d), R the elements where the
    right branch wins and L the rest: dx = gamma g / d + [R] q v + d s_i/dx sum_R q
    + d s_b/dx sum_L q, dv = sum_R q x, where d s/dx = (x - mean) / (count s).
    """
    shape, x = x.shape, _spatial(x)
    g = _spatial(grad).to(x.dtype)
    dims = _dims(x)
    count = _count(x)
    std_i, std_b = (var_i + eps).sqrt(), (var_b.view(1, -1, *(1,) * len(dims)) + eps).sqrt()
    w, wv = _channel(weight, x), _channel(weight * v, x)

    d = torch.addcmul(std_i.to(x.dtype), x, _channel(v, x))  # v x + s_i
    right = d > std_b.to(x.dtype)
    d.clamp_(min=std_b.to(x.dtype)).reciprocal_()  # 1 / d
    q = torch.mul(g, x).mul_(d)  # g x / d: g times the normalized x
    grad_weight = q.sum((0,) + dims, dtype=_acc(x))
    grad_bias = g.sum((0,) + dims, dtype=_acc(x))
    q.mul_(d)  # g x / d^2
    q_all = _sum(q, dims)
    q.mul_(right)
    q_right = _sum(q, dims)
    del right

    wf = weight.to(std_b.dtype).view_as(std_b)
    coef = -wf * q_right / (std_i * count)  # d loss / d s_i  *  d s_i / d x, per (n, c)
    shift = coef * mean_i
    if training:
        coef_b = -wf * (q_all - q_right).sum(0, keepdim=True) / (std_b * x.shape[0] * count)
        coef = coef + coef_b
        shift = shift + coef_b * mean_i.mean(0, keepdim=True)
    dx = d.mul_(g).mul_(w).addcmul_(q, -wv)  # reuses the buffer of 1 / d
    dx.addcmul_(x, coef.to(x.dtype)).sub_(shift.to(x.dtype))
    grad_v = -wf.view(-1) * _sum(q.mul_(x), dims).sum(0).view(-1)
    return (
        dx.view(shape),
        grad_v.to(v.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(weight.dtype),
    )


evonorm_b0.register_autograd(_b0_backward, setup_context=_b0_setup)


class EvoNormB0(nn.Module):
    """EvoNorm-B0 for (N, C, *spatial) inputs of any rank >= 2 (1-D, 2-D, 3-D, channels-last).

    Training uses the batch variance and updates `running_var` like timm
    (momentum, unbiased n / (n - 1)); eval uses `running_var`. Parameter and
    buffer names match timm's `EvoNorm2dB0`, so state dicts load across.
    `momentum=None` keeps a cumulative average instead, as BatchNorm does (with a
    `num_batches_tracked` buffer). `impl`: see the module docstring.
    """

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        momentum: float | None = 0.1,
        eps: float = 1e-3,
        impl: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"EvoNormB0: momentum={momentum} must be in (0, 1] or None")
        _check_impl(impl, "EvoNormB0")
        dd = {"device": device, "dtype": dtype}
        self.num_features, self.apply_act, self.momentum, self.eps = (
            num_features,
            apply_act,
            momentum,
            eps,
        )
        self.cuda_impl, self.cpu_impl = impl or CUDA_DEFAULT_IMPL, impl or "eager"
        self.weight = nn.Parameter(torch.ones(num_features, **dd))
        self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        self.v = nn.Parameter(torch.ones(num_features, **dd)) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_features, **dd))
        if momentum is None:
            self.register_buffer(
                "num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
            )

    def forward(self, x: Tensor) -> Tensor:
        v = self.v
        if v is None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            return x * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)
        impl = self.cuda_impl if x.is_cuda else self.cpu_impl
        y, _, _, var_b = torch.ops.gradlane.evonorm_b0(
            x, v, self.weight, self.bias, self.running_var, self.eps, self.training, impl
        )
        if self.training:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                unbiased = (var_b * (n / max(n - 1, 1))).to(self.running_var.dtype)
                momentum = self.momentum
                if momentum is None:  # cumulative average: weight 1 / (batches so far)
                    self.num_batches_tracked.add_(1)
                    weight = self.num_batches_tracked.reciprocal().to(unbiased.dtype)
                    self.running_var.lerp_(unbiased, weight)
                else:
                    self.running_var.lerp_(unbiased, momentum)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}"


# ---- EvoNorm-S0 -------------------------------------------------------------------------------


def _group_stats(xs: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and std, repeated per channel as (N, C, 1, ...), >= fp32."""
    mean_i, var_i = _instance_moments(xs)
    n, c = xs.shape[:2]
    mi, vi = mean_i.view(n, groups, c // groups), var_i.view(n, groups, c // groups)
    mean_g = mi.mean(2, keepdim=True)
    spread = (mi - mean_g).square().mean(2, keepdim=True)
    std_g = (vi.mean(2, keepdim=True) + spread.to(vi.dtype) + eps).sqrt_()
    shape = var_i.shape
    mean_g = mean_g.to(var_i.dtype).expand_as(vi).reshape(shape)
    return mean_g, std_g.expand_as(vi).reshape(shape)


def _s0_forward(x, v, weight, bias, groups: int, eps: float):
    xs = _spatial(x)
    mean_g, std_g = _group_stats(xs, groups, eps)
    y = torch.mul(xs, _channel(v, xs)).sigmoid_().mul_(xs)  # x sigmoid(v x)
    scale = (weight.to(std_g.dtype).view_as(std_g[:1]) / std_g).to(x.dtype)
    if torch.compiler.is_compiling():
        y = torch.addcmul(_channel(bias, xs), y, scale)
    else:
        torch.addcmul(_channel(bias, xs), y, scale, out=y)
    return y.view_as(x), mean_g, std_g


@torch.library.custom_op("gradlane::evonorm_s0", mutates_args=())
def evonorm_s0(
    x: Tensor,
    v: Tensor,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    eps: float,
    impl: str = "eager",
) -> tuple[Tensor, Tensor, Tensor]:
    """EvoNorm-S0 forward: (y, group mean, group std), the stats per channel in >= fp32."""
    _check(x, weight.numel(), "EvoNormS0")
    y, *stats = _body(_s0_forward, impl)(x, v, weight, bias, groups, eps)
    return _strided_like(y, x), *stats


@evonorm_s0.register_fake
def _(x, v, weight, bias, groups, eps, impl="eager"):
    stats = x.new_empty(_spatial(x).shape[:2] + (1,) * max(1, x.dim() - 2), dtype=_acc(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _s0_setup(ctx, inputs, output) -> None:
    x, v, weight, _, groups, _, *impl = inputs
    _, mean_g, std_g = output
    ctx.mark_non_differentiable(mean_g, std_g)
    ctx.groups, ctx.impl = groups, impl[0] if impl else "eager"
    ctx.save_for_backward(x, v, weight, mean_g, std_g)


def _s0_backward(ctx, grad, *_):
    x, v, weight, mean_g, std_g = ctx.saved_tensors
    grads = _body(_s0_grads, ctx.impl)(grad, x, v, weight, mean_g, std_g, ctx.groups)
    return (*grads, None, None, None)


def _s0_grads(grad, x, v, weight, mean_g, std_g, groups: int):
    """Gradients of S0 (x, v, gamma, beta), recomputing s = sigmoid(v x) from x.

    With k = gamma / s_g and A = x s (1 - s): dx = g k (s + v A) + d s_g/dx * sum
    over the group of (-g k x s / s_g), dv = sum g k x A, dgamma = sum g x s / s_g.
    """
    shape, x = x.shape, _spatial(x)
    g = _spatial(grad).to(x.dtype)
    dims = _dims(x)
    n, c = x.shape[:2]
    count = c // groups * _count(x)
    wf = weight.to(std_g.dtype).view_as(std_g[:1])
    k = wf / std_g

    sig = torch.mul(x, _channel(v, x)).sigmoid_()  # s
    buf = torch.mul(x, sig).mul_(g)  # g x s
    gxs = _sum(buf, dims)
    grad_weight = (gxs / std_g).sum(0).view(-1)
    if torch.compiler.is_compiling():  # A = x s (1 - s)
        buf = torch.ops.aten.sigmoid_backward(x, sig)
    else:
        torch.ops.aten.sigmoid_backward.grad_input(x, sig, grad_input=buf)
    sig.addcmul_(buf, _channel(v, x))  # s + v A
    grad_v = (k * _sum(buf.mul_(x).mul_(g), dims)).sum(0).view(-1)
    sig.mul_(k.to(x.dtype))

    # d loss / d s_g per group, spread back over the group's channels
    d_std = -(k * gxs / std_g).view(n, groups, -1).sum(2, keepdim=True)
    coef = (d_std / (std_g.view(n, groups, -1) * count)).expand(n, groups, c // groups)
    coef = coef.reshape(std_g.shape)
    if torch.compiler.is_compiling():
        buf = torch.addcmul((-coef * mean_g).to(x.dtype), g, sig)
    else:
        torch.addcmul((-coef * mean_g).to(x.dtype), g, sig, out=buf)
    buf.addcmul_(x, coef.to(x.dtype))
    grad_bias = g.sum((0,) + dims, dtype=_acc(x))
    return (
        buf.view(shape),
        grad_v.to(v.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(weight.dtype),
    )


evonorm_s0.register_autograd(_s0_backward, setup_context=_s0_setup)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 for (N, C, *spatial) inputs of any rank >= 2: batch-independent.

    `groups` (or `group_size`, channels per group) sets the group std; parameter
    names match timm's `EvoNorm2dS0`. `impl`: see the module docstring.
    """

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        eps: float = 1e-5,
        impl: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_impl(impl, "EvoNormS0")
        self.cuda_impl, self.cpu_impl = impl or CUDA_DEFAULT_IMPL, impl or "eager"
        if group_size:
            groups = num_features // group_size if num_features % group_size == 0 else 0
        if groups < 1 or num_features % groups:
            raise ValueError(
                f"EvoNormS0: num_features={num_features} is not divisible into "
                f"groups={groups} (group_size={group_size})"
            )
        dd = {"device": device, "dtype": dtype}
        self.num_features, self.groups, self.apply_act, self.eps = (
            num_features,
            groups,
            apply_act,
            eps,
        )
        self.weight = nn.Parameter(torch.ones(num_features, **dd))
        self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        self.v = nn.Parameter(torch.ones(num_features, **dd)) if apply_act else None

    def forward(self, x: Tensor) -> Tensor:
        v = self.v
        if v is None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            return x * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)
        impl = self.cuda_impl if x.is_cuda else self.cpu_impl
        y, _, _ = torch.ops.gradlane.evonorm_s0(
            x, v, self.weight, self.bias, self.groups, self.eps, impl
        )
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, apply_act={self.apply_act}"


# ---- factory and conversion -------------------------------------------------------------------

NORMS = ("evonorm_b0", "evonorm_s0")
# modules that commute with ReLU, so a ReLU after them still pairs with the norm before them
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ACTIVATION_NAMES = {"relu6", "silu", "gelu", "elu", "selu", "celu", "leaky_relu", "mish"}
_ACTIVATION_NAMES |= {"hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus"}


def evonorm(name: str, num_features: int, apply_act: bool = True, **kwargs) -> nn.Module:
    """The EvoNorm layer called `name` ("evonorm_b0" or "evonorm_s0"); S0 gets
    gcd(num_features, 32) groups unless `groups` / `group_size` is given."""
    if name == "evonorm_b0":
        return EvoNormB0(num_features, apply_act=apply_act, **kwargs)
    if name == "evonorm_s0":
        kwargs.setdefault("groups", math.gcd(num_features, 32))
        return EvoNormS0(num_features, apply_act=apply_act, **kwargs)
    raise ValueError(f"norm={name!r} is not an EvoNorm; allowed: {', '.join(NORMS)}")


def _from_batchnorm(target: str, bn: _BatchNorm, apply_act: bool) -> nn.Module:
    """An EvoNorm that starts from `bn`'s affine parameters (and, for B0, its running variance)."""
    ref = bn.weight if bn.weight is not None else bn.running_var
    dd = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    extra = {"momentum": bn.momentum} if target == "evonorm_b0" else {}
    layer = evonorm(target, bn.num_features, apply_act=apply_act, **extra, **dd)
    with torch.no_grad():
        if bn.affine:
            layer.weight.copy_(bn.weight)
            layer.bias.copy_(bn.bias)
        if target == "evonorm_b0" and bn.running_var is not None:
            layer.running_var.copy_(bn.running_var)
        if getattr(layer, "num_batches_tracked", None) is not None and bn.track_running_stats:
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    return layer


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """'relu', 'passthrough', another activation's name, or '' for anything else."""
    if node.op == "call_module":
        mod = modules[node.target]
        if type(mod) is nn.ReLU:
            return "relu"
        if isinstance(mod, _PASSTHROUGH):
            return "passthrough"
        return type(mod).__name__ if type(mod).__module__ == nn.ReLU.__module__ else ""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu"
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", node.target)
        if name in ("relu", "relu_"):
            return "relu"
        return name if str(name).rstrip("_") in _ACTIVATION_NAMES else ""
    return ""


def _follow(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, str]:
    """The activation right after a norm's output (through Identity / Dropout), and its kind."""
    while len(node.users) == 1:
        node = next(iter(node.users))
        kind = _kind(node, modules)
        if kind != "passthrough":
            return (node, kind) if kind else (None, "")
    return None, ""


WITHOUT_ACT = ("affine", "keep", "error")


def convert_norms(
    model: nn.Module, target: str, strict: bool = False, without_act: str | None = None
) -> nn.Module:
    """Replace the BatchNorm layers of `model` by EvoNorm (`target` = "evonorm_b0" | "evonorm_s0").

    A BatchNorm followed by ReLU (module, function or method, possibly through
    Identity / Dropout) becomes one EvoNorm with its activation and the ReLU
    goes. A BatchNorm not followed by an activation (before a residual add, but also
    BN -> Linear or BN -> MaxPool -> ReLU) has no EvoNorm counterpart; `without_act`
    says what happens to it: "affine" turns it into the affine-only EvoNorm, as in the
    paper's ResNets and timm (its normalisation is gone), "keep" leaves the BatchNorm,
    "error" raises ValueError; None (default) is "affine" with a warning that lists them.
    A BatchNorm with momentum=None (a cumulative average) becomes an EvoNorm-B0 with
    momentum=None. The graph is found with `torch.fx`. When module swaps suffice the
    model is converted in place and returned; when a ReLU is shared with other call
    sites (torchvision ResNets) or functional, the rewritten `fx.GraphModule` is
    returned: always use the returned model. BatchNorms it cannot convert (followed by
    another activation, called more than once, or not reached by the trace) are listed
    in a warning, or raise `ValueError` when `strict`. Nothing changes before an error.
    """
    if target not in NORMS:
        allowed = ", ".join(NORMS)
        raise ValueError(f"target={target!r} is not a conversion target; allowed: {allowed}")
    if without_act is not None and without_act not in WITHOUT_ACT:
        raise ValueError(
            f"without_act={without_act!r} is not allowed; allowed: {', '.join(WITHOUT_ACT)}"
        )
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds; report them all the same way
        raise ValueError(
            f"convert_norms: {type(model).__name__} cannot be traced by torch.fx ({err})"
        ) from err
    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)

    plan, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, _BatchNorm):
            continue
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            skipped[name] = f"called {len(nodes)} times in forward" if nodes else "not reached"
            continue
        act, kind = _follow(nodes[0], modules)
        if kind not in ("relu", ""):
            skipped[name] = f"followed by {kind}; EvoNorm replaces BatchNorm+ReLU only"
            continue
        plan.append((nodes[0], act))
    if skipped:
        msg = "; ".join(f"{k} ({v})" for k, v in skipped.items())
        if strict:
            raise ValueError(f"convert_norms: cannot convert {len(skipped)} layer(s): {msg}")
        warnings.warn(f"convert_norms: left {len(skipped)} BatchNorm layer(s): {msg}", stacklevel=2)
    bare = [bn.target for bn, act in plan if act is None]
    if bare and without_act == "error":
        raise ValueError(
            f"convert_norms: {len(bare)} BatchNorm layer(s) not followed by an activation: "
            f"{', '.join(bare)} (without_act='error'; 'affine' or 'keep' converts the rest)"
        )
    if bare and without_act is None:
        warnings.warn(
            f"convert_norms: {len(bare)} BatchNorm layer(s) not followed by an activation "
            f"became affine-only EvoNorm, without normalisation: {', '.join(bare)}; pass "
            "without_act='affine' to accept, 'keep' to leave them BatchNorm, 'error' to refuse",
            stacklevel=2,
        )
    if without_act == "keep":
        plan = [(bn, act) for bn, act in plan if act is not None]

    def swappable(act: fx.Node | None) -> bool:
        return act is None or (act.op == "call_module" and len(calls[act.target]) == 1)

    in_place = all(swappable(act) for _, act in plan)
    root = model if in_place else gm
    for bn, act in plan:
        root.set_submodule(bn.target, _from_batchnorm(target, modules[bn.target], act is not None))
        if act is None:
            continue
        if in_place:
            root.set_submodule(act.target, nn.Identity())
        else:
            act.replace_all_uses_with(act.args[0])
            gm.graph.erase_node(act)
    if not in_place:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return root
