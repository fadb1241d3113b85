"""M-FAC: a matrix-free inverse-Fisher preconditioner over a sliding window of gradients.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021 (the dynamic / sliding-window algorithm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from .fisher import admit, new_system
from .shard import Shard, plan
from .window import combine, compute_dtype, dots

WINDOW_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
STATE_KEY = "mfac"  # the optimizer-wide state: window, Gram matrix, inverse, counters


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {what}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MFAC(torch.optim.Optimizer):
    """SGD preconditioned by the inverse empirical Fisher of the last `ngrads` gradients.

    The step is ``p -= lr * v`` with ``v = momentum * v + F^{-1} g`` (``v = F^{-1} g``
    without momentum), where g is the flattened gradient of all parameters and

        F = damp * I + (1/k) * sum_{i=1..k} g_i g_i^T

    over the k = min(steps, ngrads) most recent accepted gradients, the current one
    included. Weight decay is either coupled (``g += weight_decay * p`` before g enters
    the window, so the Fisher sees the regularised gradient) or, with
    ``decoupled_weight_decay=True``, applied AdamW-style as ``p *= 1 - lr * weight_decay``.

    F^{-1} scales directions the window has rarely seen by up to 1/damp and frequent
    ones by much less, so lr / damp is the largest effective step size. The defaults
    (damp 1e-2, momentum 0.9) are tuned on the lm recipe, whose gradients have norms
    around 1; damp should scale with the squared gradient norm.

    How, without ever forming a d x d matrix (m = ngrads, d parameters):

    1. one pass over the window computes the dot products G g of the new gradient with
       the stored ones (all-reduced over the ranks when the window is sharded);
    2. the new gradient replaces the oldest one; its dot products give the new row and
       column of the m x m matrix K = k*damp*I + G G^T, whose inverse is updated in
       O(m^2) by a rank-1 downdate (drop the oldest) and a rank-1 update (add the
       newest), refined once against K (iterative refinement, two more O(m^2)
       products), and refactored from the stored Gram matrix once per lap of the window
       (the paper's reference code re-solves an m x m system every step, O(m^3));
    3. by the push-through identity F^{-1} G^T = k G^T K^{-1}, the preconditioned
       gradient is F^{-1} g = G^T (k K^{-1} e_j), j the new gradient's slot: a second
       pass over the window with a column of K^{-1} as coefficients.

    Cost per step with a full window: two passes over the m x d window plus O(m^2 + d)
    (and an O(m^3) refactorisation once every m steps, O(m^2) amortised); a warm-up step
    with k < m gradients costs O(kd + k^3), because the shift k*damp of K changes with k.
    Memory: the window (m x d in `window_dtype`), two m x m fp64 matrices, and a momentum
    buffer. The m x m algebra always runs in fp64; a bf16 / fp16 window is multiplied in
    fp32, and the gradient preconditioned is the one stored (g rounded to `window_dtype`),
    so F^{-1} g lies in the span of the window exactly.

    ``shard_window=True`` under torch.distributed stores only this rank's ~d/R columns of
    every window gradient: the dot products are all-reduced (m+1 numbers a step) and
    the update slices all-gathered, so every rank applies the update of the unsharded
    optimizer. Under DeepSpeed ZeRO-1/2 the optimizer only ever holds this rank's flat
    partition; the window then stores that partition and the dot products are always
    all-reduced (F is the whole model's Fisher), with no gather (ZeRO gathers the
    parameters itself).

    The parameters the window covers are fixed at the first step (the next one after
    `load_state_dict`): those whose ``requires_grad`` is then True. Freezing or unfreezing
    parameters between building the optimizer and that step is fine (under DDP too: the
    window stays replicated or sliced); changing ``requires_grad`` later would change the
    window's columns and raises a ValueError: build a new optimizer. A ZeRO partition is
    recognised by identity: the wrapper hands the optimizer tensors it was not built with.

    Parameters without a gradient at a step contribute zeros to that window gradient and
    are not updated. A gradient whose dot products are not finite (a NaN or inf in g), or
    one that would leave K numerically singular (damp far too small for the gradients'
    scale), is rejected with a RuntimeWarning: the step is skipped, counted in
    `skipped_steps`, and the window is untouched.
    All state (window, Gram matrix, inverse, counters, momentum) is in `self.state`, so
    `state_dict()` / `load_state_dict()` resume exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        ngrads: int = 1024,
        damp: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        window_dtype: str = "float32",
        shard_window: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        ok = isinstance(ngrads, int) and not isinstance(ngrads, bool) and ngrads >= 1
        _require(ok, "ngrads", ngrads, "must be an int >= 1")
        _require(_is_number(damp) and 0 < damp < math.inf, "damp", damp, "must be > 0")
        _require(
            window_dtype in WINDOW_DTYPES,
            "window_dtype",
            window_dtype,
            f"is not one of {', '.join(WINDOW_DTYPES)}",
        )
        self.ngrads = ngrads
        self.damp = float(damp)
        self.window_dtype = WINDOW_DTYPES[window_dtype]
        self.shard_window = bool(shard_window)
        self.process_group = process_group
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        # set before super().__init__, which calls add_param_group
        self._built_with: list[torch.Tensor] = []  # every parameter added, kept for identity
        self._params: list[tuple[torch.Tensor, dict]] | None = None  # fixed at the first step
        self._shard: Shard | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if self._params is not None:
            raise ValueError("MFAC.add_param_group after the first step would reshape the window")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._built_with.extend(group["params"])
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        _require(_is_number(lr) and 0 <= lr < math.inf, "lr", lr, "must be >= 0")
        _require(_is_number(mom) and 0 <= mom < 1, "momentum", mom, "must be in [0, 1)")
        _require(_is_number(wd) and 0 <= wd < math.inf, "weight_decay", wd, "must be >= 0")

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradient was rejected (not finite, or a singular window system)."""
        return self.state[STATE_KEY]["skipped"] if STATE_KEY in self.state else 0

    def _trainable(self) -> list[tuple[torch.Tensor, dict]]:
        """(parameter, its group) for every parameter with requires_grad, in order."""
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _where(self, p: torch.Tensor) -> str:
        """Where `p` sits in param_groups, for error messages."""
        for g, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{g}]['params'][{i}] of shape {tuple(p.shape)}"
        return f"a removed parameter of shape {tuple(p.shape)}"

    def _check_trainable(self) -> None:
        """Raise if requires_grad changed since the window's parameters were fixed."""
        now = [p for p, _ in self._trainable()]
        now_ids, fixed_ids = {id(p) for p in now}, {id(p) for p, _ in self._params}
        if now_ids == fixed_ids:
            return
        frozen = [self._where(p) for p, _ in self._params if id(p) not in now_ids]
        thawed = [self._where(p) for p in now if id(p) not in fixed_ids]
        what = [
            f"{label}: {', '.join(names)}"
            for label, names in (("now frozen", frozen), ("now trainable", thawed))
            if names
        ]
        raise ValueError(
            f"MFAC: the trainable parameters changed after the first step ({'; '.join(what)}); "
            "build a new optimizer"
        )

    def _setup(self) -> None:
        """Fix the parameters, their order and this rank's columns; create or check the window."""
        held = self._trainable()
        params = [p for p, _ in held]
        if not params:
            raise ValueError("MFAC got no parameters that require grad")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}"
            )
        n = sum(p.numel() for p in params)
        # a ZeRO wrapper swaps in its own flat partitions for the parameters we were built with
        built_with = {id(p) for p in self._built_with}
        partitioned = not any(id(p) in built_with for p in params)
        shard = plan(n, partitioned, self.shard_window, self.process_group)
        device = params[0].device
        shape = (self.ngrads, shard.hi - shard.lo)
        state = self.state.get(STATE_KEY)
        if state is None:
            state = new_system(self.ngrads, device)
            state.update(rows=torch.zeros(shape, dtype=self.window_dtype, device=device), skipped=0)
        elif tuple(state["rows"].shape) != shape or state["rows"].dtype != self.window_dtype:
            raise ValueError(
                f"loaded MFAC window has shape {tuple(state['rows'].shape)} and dtype "
                f"{state['rows'].dtype}, this optimizer needs {shape} and {self.window_dtype} "
                "(different parameters, ngrads, window_dtype or number of ranks)"
            )
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = value.to(device)
        self.state[STATE_KEY] = state
        self._params, self._shard = held, shard

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch keeps optimizer-wide entries as given (uncast, possibly shared with the
        # caller's dict): copy them so stepping never writes into a saved checkpoint.
        if STATE_KEY in self.state:
            loaded = self.state[STATE_KEY]
            self.state[STATE_KEY] = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in loaded.items()
            }
        self._params = self._shard = None

    def _flat_grad(self) -> torch.Tensor | None:
        """Flattened gradient (coupled weight decay added), zeros where .grad is None."""
        pieces, found = [], False
        dtype = torch.float32
        for p, group in self._params:
            wd = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
            dtype = torch.promote_types(dtype, p.dtype)
            if p.grad is None:
                pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
                continue
            if p.grad.is_sparse:
                raise ValueError("MFAC does not support sparse gradients")
            found = True
            grad = p.grad.reshape(-1)
            pieces.append(grad + wd * p.reshape(-1) if wd else grad)
        return torch.cat([x.to(dtype) for x in pieces]) if found else None

    def _apply(self, update: torch.Tensor) -> None:
        offset = 0
        for p, group in self._params:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            d = update[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                continue
            if group["decoupled_weight_decay"] and wd:
                p.mul_(1 - lr * wd)
            if mom:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                d = buf.mul_(mom).add_(d)
            p.add_(d.to(p.dtype), alpha=-lr)

    def _reject(self, loss, why: str):
        """Skip this step (window untouched), count it, warn (once per reason)."""
        self.state[STATE_KEY]["skipped"] += 1
        warnings.warn(f"MFAC skipped a step: {why}", RuntimeWarning, stacklevel=2)
        return loss

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One M-FAC step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._params is None:
            self._setup()
        else:
            self._check_trainable()
        grad = self._flat_grad()
        if grad is None:
            return loss
        state, shard = self.state[STATE_KEY], self._shard
        rows = state["rows"]
        part = grad[shard.lo : shard.hi]
        stored = part.to(self.window_dtype)
        x = stored.to(compute_dtype(self.window_dtype))

        filled = min(state["count"], self.ngrads)
        products = torch.empty(filled + 1, dtype=torch.float64, device=rows.device)
        products[:filled] = dots(rows[:filled], x)
        products[filled] = torch.dot(x, x).double()
        shard.reduce(products)
        if not bool(torch.isfinite(products).all()):
            return self._reject(loss, "the gradient is not finite (NaN or inf)")
        admitted = admit(state, products[:filled], products[filled], self.damp)
        if admitted is None:
            return self._reject(
                loss,
                "k*damp*I + G G^T is not numerically positive definite: damp is too small "
                "for the size of the gradients (fp32 dot products); increase damp",
            )
        slot, coef = admitted
        rows[slot] = stored

        update = combine(rows[: coef.numel()], coef).to(grad.dtype)
        self._apply(shard.gather(update))
        return loss
