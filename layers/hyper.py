"""Magnitude-invariant (MIP) hypernetworks: `HyperNet` and `hypernetize`.

Ortiz, Guttag, Dalca, "Magnitude Invariant Parametrizations Improve Hypernetwork
Learning", ICLR 2024. A hypernetwork maps hyper-inputs gamma (e.g. a loss weight)
to the weights theta of a primary network, so one training run serves every
setting of gamma. With a plain MLP the magnitude of theta follows the magnitude
of gamma, which slows and destabilises training. MIP removes that dependence:

    encode each gamma_i in [0, 1] as [cos(pi gamma_i / 2), sin(pi gamma_i / 2)]  (norm 1)
    theta = theta_0 + delta(encoded gamma)        (theta_0 learned directly)

The layout follows the `hyperlight` package: inputs are concatenated in sorted
name order, encoded as [cos block, sin block], and the outputs are slices of one
flat vector in the order given; theta_0 is that vector's bias.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

ENCODINGS = ("mip", "none")


def mip_encode(x: Tensor) -> Tensor:
    """[cos(pi x / 2), sin(pi x / 2)] along the last dimension: norm 1 per input scalar."""
    z = x * (math.pi / 2)
    return torch.cat([torch.cos(z), torch.sin(z)], dim=-1)


class HyperNet(nn.Module):
    """An MLP from named hyper-inputs to named weight tensors.

    `inputs` maps each hyper-input to its number of scalars, `outputs` each
    predicted tensor to its shape. `encoding="mip"` encodes inputs (which must
    lie in [0, 1]) as above, `"none"` feeds them raw. `residual=True` predicts
    theta = theta_0 + delta with delta's last layer starting at zero, so theta
    starts at theta_0 (`init`, else kaiming-normal matrices and zero vectors);
    `residual=False` predicts theta directly (the parametrisation the paper
    compares against). Layers are kaiming-normal in torch's default fan-in mode
    (std = gain / sqrt(in_features)) with zero biases; hidden layers use LeakyReLU.
    hyperlight's MLP defaults to fan-out mode instead (std = gain / sqrt(out_features),
    with the output layer initialised as one layer per predicted tensor), so freshly
    built networks differ in scale from hyperlight's; the layout is the same.

    With Adam, every predicted entry moves by about lr * sum_j |h_j| per step
    through delta's last layer (h: the last hidden layer), a larger step than
    theta_0's lr: lower the learning rate when many weights are predicted.

    `forward(hyper)` takes a mapping name -> value (or one tensor when there is
    one input): shape (dim,) for one setting, giving tensors of the output shapes;
    (B, dim) for a batch, giving (B, *shape). An input of one scalar (dim 1) is one
    setting as a Python number or 0-d tensor, and a batch as any 1-D tensor (B,):
    `torch.tensor([0.3])` is a batch of one, with outputs of shape (1, *shape).
    With `encoding="mip"` every value must lie in [0, 1]; NaN is refused too. Values
    given as numbers or CPU tensors are checked on the host; tensors on an accelerator
    are checked on the device (`torch._assert_async`), so the forward never waits.
    """

    def __init__(
        self,
        inputs: Mapping[str, int],
        outputs: Mapping[str, Sequence[int]],
        hidden: Sequence[int] = (64, 64),
        encoding: str = "mip",
        residual: bool = True,
        init: Mapping[str, Tensor] | None = None,
    ):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(
                f"encoding={encoding!r} is not allowed; allowed: {', '.join(ENCODINGS)}"
            )
        if not inputs or not outputs:
            raise ValueError(f"HyperNet needs inputs and outputs (inputs={dict(inputs)!r})")
        for name, dim in inputs.items():
            if int(dim) < 1:
                raise ValueError(f"inputs[{name!r}]={dim!r} must be a positive number of scalars")
        self.inputs = {k: int(inputs[k]) for k in sorted(inputs)}
        self.outputs = {k: tuple(int(s) for s in shape) for k, shape in outputs.items()}
        self.encoding, self.residual = encoding, residual
        sizes = [sum(self.inputs.values()) * (2 if encoding == "mip" else 1), *map(int, hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LeakyReLU()]
        total = sum(math.prod(s) for s in self.outputs.values())
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(sizes[-1], total, bias=not residual)
        for layer in (*layers[::2], self.out):
            gain = "leaky_relu" if layer is not self.out else "linear"
            nn.init.kaiming_normal_(layer.weight, nonlinearity=gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if residual:
            nn.init.zeros_(self.out.weight)
            self.theta0 = nn.Parameter(self._initial_theta(init or {}))

    def _initial_theta(self, init: Mapping[str, Tensor]) -> Tensor:
        parts = []
        for name, shape in self.outputs.items():
            t = torch.zeros(shape)
            if name in init:
                if tuple(init[name].shape) != shape:
                    raise ValueError(
                        f"init[{name!r}] has shape {tuple(init[name].shape)}, not {shape}"
                    )
                t.copy_(init[name].detach())
            elif len(shape) > 1:
                nn.init.kaiming_normal_(t)
            parts.append(t.flatten())
        return torch.cat(parts)

    def _flat_inputs(self, hyper: Mapping[str, Tensor | float] | Tensor | float) -> Tensor:
        """(in_features,) for one setting or (B, in_features) for a batch, checked and encoded."""
        if not isinstance(hyper, Mapping):
            if len(self.inputs) != 1:
                raise ValueError(f"hyper: pass a mapping with keys {list(self.inputs)}")
            hyper = {next(iter(self.inputs)): hyper}
        if set(hyper) != set(self.inputs):
            raise ValueError(f"hyper keys {sorted(hyper)} are not {list(self.inputs)}")
        ref = self.out.weight
        cols = []
        for name, dim in self.inputs.items():
            x = torch.as_tensor(hyper[name], dtype=ref.dtype)  # numbers: on the CPU
            shape = tuple(x.shape)
            if dim == 1 and x.dim() < 2:  # 0-d: one setting; (B,): a batch, B = 1 included
                x = x.reshape(-1, 1) if x.dim() == 1 else x.reshape(1)
            if x.dim() not in (1, 2) or x.shape[-1] != dim:
                raise ValueError(
                    f"hyper[{name!r}] has shape {shape}; expected ({dim},) or (B, {dim})"
                    + (" (a 0-d value or (B,) for one scalar)" if dim == 1 else "")
                )
            if self.encoding == "mip":
                self._check_unit_range(name, x)
            cols.append(x.to(ref.device))
        if len({x.shape[:-1] for x in cols}) > 1:
            shapes = {k: tuple(x.shape) for k, x in zip(self.inputs, cols, strict=True)}
            raise ValueError(f"hyper inputs disagree on the batch: {shapes}")
        flat = torch.cat(cols, dim=-1)
        return mip_encode(flat) if self.encoding == "mip" else flat

    @staticmethod
    def _check_unit_range(name: str, x: Tensor) -> None:
        """Every value in [0, 1] (NaN fails the test); on the device for accelerator tensors."""
        inside = (x >= 0) & (x <= 1)
        what = f"hyper[{name!r}] must lie in [0, 1] (encoding='mip')"
        if x.device.type != "cpu":
            torch._assert_async(inside.all(), what)
        elif not bool(inside.all()):
            bad = x[~inside][0].item()
            raise ValueError(f"hyper[{name!r}]={bad:g} is outside [0, 1] (encoding='mip')")

    def forward(self, hyper: Mapping[str, Tensor | float] | Tensor | float) -> dict[str, Tensor]:
        flat = self.out(self.mlp(self._flat_inputs(hyper)))
        if self.residual:
            flat = flat + self.theta0
        lead = flat.shape[:-1]
        out, offset = {}, 0
        for name, shape in self.outputs.items():
            size = math.prod(shape)
            out[name] = flat[..., offset : offset + size].reshape(*lead, *shape)
            offset += size
        return out


class Hypernetized(nn.Module):
    """`module` with some parameters predicted by `hypernet`; call as `model(*args, hyper=...)`.

    One hyper setting runs `module` once with the predicted weights; a batch of
    B settings runs sample b of every tensor argument with setting b (via
    `torch.func.vmap`; the module must not use batch statistics or in-place
    buffer updates, e.g. EvoNorm-S0 rather than BatchNorm). All parameters are
    ordinary `nn.Parameter`s, so DDP and its comm hooks see a plain model.
    """

    def __init__(self, module: nn.Module, hypernet: HyperNet, aliases: Mapping[str, list[str]]):
        super().__init__()
        self.module = module
        self.hypernet = hypernet
        self.aliases = dict(aliases)

    def forward(self, *args, hyper: Mapping[str, Tensor | float] | Tensor | float, **kwargs):
        predicted = self.hypernet(hyper)
        name, t = next(iter(predicted.items()))
        batched = t.dim() > len(self.hypernet.outputs[name])
        theta = {alias: predicted[n] for n, names in self.aliases.items() for alias in names}
        if not batched:
            return functional_call(self.module, theta, args, kwargs)

        def one(th, *a):  # sample b as a batch of one, with its own weights
            a = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, a)
            y = functional_call(self.module, th, a, kwargs)
            return tree_map(lambda x: x.squeeze(0) if isinstance(x, Tensor) else x, y)

        dims = tuple(0 if isinstance(a, Tensor) else None for a in args)
        return vmap(one, in_dims=(0, *dims), randomness="different")(theta, *args)


def hypernetize(
    module: nn.Module,
    which: str | Iterable[str],
    inputs: Mapping[str, int],
    hidden: Sequence[int] = (64, 64),
    encoding: str = "mip",
    residual: bool = True,
) -> Hypernetized:
    """Turn the parameters of `module` named by `which` (names or fnmatch patterns
    such as "*.weight") into outputs of a `HyperNet` over `inputs`.

    The chosen parameters leave `module` (in place: they read as None there) and
    become theta_0 of the hypernetwork, so with `residual=True` the result computes
    exactly what `module` did until training moves delta away from zero.
    """
    patterns = [which] if isinstance(which, str) else list(which)
    owners: dict[int, list[str]] = {}
    params: dict[int, Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
        params[id(p)] = p
    chosen: dict[int, None] = {}
    for pattern in patterns:
        hits = [
            i for i, names in owners.items() if any(fnmatch.fnmatchcase(n, pattern) for n in names)
        ]
        if not hits:
            raise ValueError(f"which={pattern!r} matches no parameter of {type(module).__name__}")
        chosen.update(dict.fromkeys(hits))
    aliases = {owners[i][0]: owners[i] for i in chosen}
    init = {owners[i][0]: params[i].detach() for i in chosen}
    hypernet = HyperNet(
        inputs,
        {name: tuple(t.shape) for name, t in init.items()},
        hidden=hidden,
        encoding=encoding,
        residual=residual,
        init=init,
    ).to(next(iter(init.values())))
    for names in aliases.values():
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._parameters[leaf] = None  # supplied at call time
    return Hypernetized(module, hypernet, aliases)
