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

from .fisher import admit, error_estimate, new_system, refactor
from .shard import Shard, plan
from .window import combine, compute_dtype, dots

WINDOW_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
STATE_KEY = "mfac"  # the optimizer-wide state: window, Gram matrix, inverse, counters
ERROR_WARNING = 1.0  # estimated relative error of an update past which MFAC warns (once)
# the settings the window's algebra depends on, saved with the state and checked on load
FIXED_SETTINGS = ("ngrads", "window_dtype", "layout", "lo", "hi", "n")


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {what}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gated(ok: torch.Tensor, value: float, otherwise: float) -> torch.Tensor:
    """`value` where `ok` else `otherwise`, a 0-d fp64 tensor on ok's device (no host sync)."""
    return torch.where(ok, torch.full((), value, dtype=torch.float64, device=ok.device), otherwise)


def _sharded_by_wrapper(p: torch.Tensor) -> str | None:
    """Which wrapper holds only a shard of `p` (FSDP, ZeRO-3, a DTensor), or None."""
    if getattr(p, "_fsdp_flattened", False):
        return "FSDP (a flat or flattened parameter)"
    if hasattr(p, "ds_id"):
        return "DeepSpeed ZeRO-3 (a partitioned parameter)"
    if dist.is_available() and type(p).__name__ == "DTensor":
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor):
            return "a DTensor (FSDP2 fully_shard or tensor parallelism)"
    return None


class MFAC(torch.optim.Optimizer):
    """SGD preconditioned by the inverse empirical Fisher of the last `ngrads` gradients.

    The step is ``p -= lr * v`` with ``v = momentum * v + u`` (``v = u`` without
    momentum; ``v = momentum * v + (1 - momentum) * u`` with ``ema_momentum=True``, the
    form of the paper's reference code), ``u = F^{-1} g``, g the flattened gradient of all
    parameters and

        F = damp * I + (1/k) * sum_{i=1..k} g_i g_i^T

    over the k = min(steps, ngrads) most recent gradients, the current one included: the
    normalisation is 1/k during the first `ngrads` steps (warm-up) and 1/ngrads after.
    Weight decay is either coupled (``g += weight_decay * p`` before g enters the
    window, so the Fisher sees the regularised gradient) or, with
    ``decoupled_weight_decay=True``, applied AdamW-style as ``p *= 1 - lr * weight_decay``.

    Two deviations from the reference code (Frantar et al.'s M-FAC repository): its
    momentum is the exponential average ``v = mu v + (1 - mu) u``, whose steps at mu=0.9 are
    10x smaller than ours at the same lr (``ema_momentum=True`` selects it); and it
    starts from a full window, where this class uses the gradients seen so far (1/k).

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
    costs O(kd + k^3), because the shift k*damp of K changes with k. The gradient is
    gathered with one `torch.cat` and the update applied with `torch._foreach_*`
    operations, so hundreds of parameter tensors cost a few kernels, not hundreds.
    Memory: the window (m x d in `window_dtype`), two m x m fp64 matrices, and a momentum
    buffer. The m x m algebra always runs in fp64. A bf16 / fp16 window's products
    accumulate and return in fp32 (see `window.py`), and the gradient preconditioned is
    the one stored (g rounded to `window_dtype`), so F^{-1} g lies in the span of the
    window exactly. An fp16 window stores each gradient divided by a power of two near its
    largest entry (kept per slot), so gradients of any size fit fp16's range.

    A step never waits for the device: which branch of the algebra runs depends on the
    step count only, and the checks below are computed on the device and read back once
    their values have arrived (at once on the CPU, a later step or `metrics()` on a GPU).

    Numerics made visible: every step estimates the relative error of its update from the
    window's rounding (`fisher.error_estimate`; with an fp32 window and unit-norm
    gradients it grows like 1/damp). `metrics()` returns it with the skipped-step count,
    and a RuntimeWarning is issued the first time it exceeds ERROR_WARNING (1.0): use a
    larger damp or an fp64 window.

    ``shard_window=True`` under torch.distributed stores only this rank's ~d/R columns of
    every window gradient: the dot products are all-reduced (m+1 numbers a step) and
    the update slices all-gathered, so every rank applies the update of the unsharded
    optimizer. Under DeepSpeed ZeRO-1/2 the optimizer only ever holds this rank's flat
    partition; the window then stores that partition and the dot products are always
    all-reduced (F is the whole model's Fisher), with no gather (ZeRO gathers the
    parameters itself). Parameters that a wrapper shards itself -- FSDP's flat
    parameters, DeepSpeed ZeRO-3, DTensors (FSDP2) -- are refused with a ValueError: each
    rank would precondition with its own shard's Fisher.

    The parameters the window covers are fixed at the first step (the next one after
    `load_state_dict`): those whose ``requires_grad`` is then True. Freezing or unfreezing
    parameters between building the optimizer and that step is fine (under DDP too: the
    window stays replicated or sliced); changing ``requires_grad`` later would change the
    window's columns and raises a ValueError: build a new optimizer. A ZeRO partition is
    recognised by identity: the wrapper hands the optimizer tensors it was not built with.

    Parameters without a gradient at a step contribute zeros to that window gradient and
    are not updated. A gradient whose dot products are not finite (a NaN or inf in g), or
    one that would leave K numerically singular (damp far too small for the gradients'
    scale), is rejected with a RuntimeWarning: parameters and momentum stay as they were,
    the step is counted in `skipped_steps`, and the Gram matrix, inverse and stored rows
    are unchanged. The window's cursor still moves on (a rejected warm-up slot holds a
    zero gradient until the next lap; later the slot keeps its gradient one lap longer).

    All state (window, Gram matrix, inverse, counters, momentum, and the settings the
    window depends on) is in `self.state`, so `state_dict()` / `load_state_dict()` resume
    exactly. Loading into an optimizer with another `ngrads`, `window_dtype` or sharding
    raises a ValueError at the first step; another `damp` rebuilds K^{-1} from the saved
    Gram matrix (which does not depend on damp).
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
        ema_momentum: bool = False,
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
            "ema_momentum": ema_momentum,
        }
        # set before super().__init__, which calls add_param_group
        self._built_with: list[torch.Tensor] = []  # every parameter added, kept for identity
        self._params: list[tuple[torch.Tensor, dict]] | None = None  # fixed at the first step
        self._shard: Shard | None = None
        self._pending: list[tuple[object, torch.Tensor]] = []  # checks not yet read back
        self._last_error = 0.0
        self._warned_error = False
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
        self._refuse_wrapper_shards(group["params"])

    def _refuse_wrapper_shards(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            wrapper = _sharded_by_wrapper(p)
            if wrapper:
                raise ValueError(
                    f"MFAC: {self._where(p)} is sharded by {wrapper}; M-FAC needs the whole "
                    "gradient (or a ZeRO-1/2 partition) to precondition with the model's "
                    "Fisher: use DDP (optionally shard_window=True) or ZeRO stage 1 or 2"
                )

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradient was rejected (not finite, or a singular window system)."""
        return int(self.state[STATE_KEY]["skipped"]) if STATE_KEY in self.state else 0

    def metrics(self) -> dict[str, float]:
        """Numbers to log: skipped steps and the last step's estimated relative update error.

        Waits for the device (call it when logging, not every step).
        """
        self._read_checks(wait=True)
        return {
            "mfac/skipped_steps": float(self.skipped_steps),
            "mfac/error_estimate": self._last_error,
        }

    def _trainable(self) -> list[tuple[torch.Tensor, dict]]:
        """(parameter, its group) for every parameter with requires_grad, in order."""
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _where(self, p: torch.Tensor) -> str:
        """Where `p` sits in param_groups, for error messages."""
        for g, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{g}]['params'][{i}] of shape {tuple(p.shape)}"
        return f"a parameter of shape {tuple(p.shape)}"

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

    def _settings(self, shard: Shard) -> dict:
        dtype = next(k for k, v in WINDOW_DTYPES.items() if v == self.window_dtype)
        return {
            "ngrads": self.ngrads,
            "window_dtype": dtype,
            "damp": self.damp,
            "layout": shard.layout,
            "lo": shard.lo,
            "hi": shard.hi,
            "n": shard.n,
        }

    def _check_loaded(self, state: dict, settings: dict, shape: tuple[int, int]) -> None:
        """Refuse a loaded window built with other settings; rebuild K^{-1} for another damp."""
        saved = state.get("settings", {})
        wrong = [
            f"{k}={saved[k]!r} (this optimizer: {settings[k]!r})"
            for k in FIXED_SETTINGS
            if k in saved and saved[k] != settings[k]
        ]
        if tuple(state["rows"].shape) != shape or state["rows"].dtype != self.window_dtype:
            wrong.append(
                f"window of shape {tuple(state['rows'].shape)} and dtype {state['rows'].dtype} "
                f"(this optimizer: {shape} and {self.window_dtype})"
            )
        if wrong:
            raise ValueError(
                f"loaded MFAC state was built with {'; '.join(wrong)}: different parameters, "
                "ngrads, window_dtype or sharding (number of ranks); build the optimizer "
                "with the saved settings or start a new window"
            )
        if saved.get("damp") != self.damp and not refactor(state, self.damp):
            raise ValueError(
                f"damp={self.damp!r}: the loaded window (saved with damp="
                f"{saved.get('damp')!r}) is numerically singular with it; increase damp"
            )

    def _setup(self) -> None:
        """Fix the parameters, their order and this rank's columns; create or check the window."""
        held = self._trainable()
        params = [p for p, _ in held]
        if not params:
            raise ValueError("MFAC got no parameters that require grad")
        self._refuse_wrapper_shards([*params, *self._built_with])
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
        settings = self._settings(shard)
        state = self.state.get(STATE_KEY)
        if state is None:
            state = new_system(self.ngrads, device)
            state["rows"] = torch.zeros(shape, dtype=self.window_dtype, device=device)
        else:
            self._check_loaded(state, settings, shape)
        state["settings"] = settings
        # created on the device: a host-to-device copy would synchronise
        skipped = state.get("skipped", 0)
        state["skipped"] = (
            skipped
            if torch.is_tensor(skipped)
            else torch.full((), skipped, dtype=torch.int64, device=device)
        )
        if self.window_dtype == torch.float16 and "scales" not in state:
            state["scales"] = torch.ones(self.ngrads, dtype=torch.float64, device=device)
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
        pieces: list[torch.Tensor] = []
        decayed: dict[float, list[int]] = {}  # coupled weight decay -> positions in pieces
        for p, group in self._params:
            if p.grad is None:
                pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
                continue
            if p.grad.is_sparse:
                raise ValueError("MFAC does not support sparse gradients")
            wd = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
            if wd:
                decayed.setdefault(wd, []).append(len(pieces))
            pieces.append(p.grad.reshape(-1))
        if all(p.grad is None for p, _ in self._params):
            return None
        params = [p.reshape(-1) for p, _ in self._params]
        for wd, where in decayed.items():
            sums = torch._foreach_add(
                [pieces[i] for i in where], [params[i] for i in where], alpha=wd
            )
            for i, t in zip(where, sums, strict=True):
                pieces[i] = t
        dtype = torch.promote_types(torch.float32, pieces[0].dtype)
        for t in pieces:
            dtype = torch.promote_types(dtype, t.dtype)
        return torch.cat(pieces).to(dtype)

    def _apply(self, update: torch.Tensor, ok: torch.Tensor) -> None:
        """p -= lr * v per group with foreach operations; nothing moves where `ok` is False."""
        views = update.split([p.numel() for p, _ in self._params])
        by_group: dict[int, tuple[dict, list, list]] = {}
        for (p, group), d in zip(self._params, views, strict=True):
            if p.grad is None:
                continue
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(p)
            entry[2].append(d.view_as(p))
        for group, params, steps in by_group.values():
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            if group["decoupled_weight_decay"] and wd:
                torch._foreach_mul_(params, _gated(ok, 1 - lr * wd, 1.0))
            if not mom:  # the update itself is zero when rejected
                torch._foreach_add_(params, steps, alpha=-lr)
                continue
            bufs = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(bufs, _gated(ok, mom, 1.0))
            torch._foreach_add_(bufs, steps, alpha=1 - mom if group["ema_momentum"] else 1.0)
            torch._foreach_add_(params, torch._foreach_mul(bufs, _gated(ok, -lr, 0.0)))

    def _store(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradient as the window stores it, and its power-of-two scale (fp16 only)."""
        if self.window_dtype != torch.float16:
            return part.to(self.window_dtype), None
        top = part.abs().max().double().clamp_min(torch.finfo(torch.float32).tiny)
        scale = torch.exp2(torch.ceil(torch.log2(top)))
        return (part / scale.to(part.dtype)).to(torch.float16), scale

    def _check_later(self, flags: torch.Tensor) -> None:
        """Queue [not finite, singular, error estimate] to be read once it has arrived."""
        event = None
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flags.to("cpu")
        self._pending.append((event, host))
        self._read_checks(wait=False)

    def _read_checks(self, wait: bool) -> None:
        """Warn about the steps whose checks have arrived (all of them when `wait`)."""
        while self._pending:
            event, host = self._pending[0]
            if event is not None and not (wait or event.query()):
                return
            if event is not None:
                event.synchronize()
            self._pending.pop(0)
            not_finite, singular, error = host.numpy().tolist()
            if not_finite:
                self._warn("MFAC skipped a step: the gradient is not finite (NaN or inf)")
            elif singular:
                self._warn(
                    "MFAC skipped a step: k*damp*I + G G^T is not numerically positive "
                    "definite: damp is too small for the size of the gradients; increase damp"
                )
            else:
                self._last_error = error
            if error > ERROR_WARNING and not self._warned_error:
                self._warned_error = True
                self._warn(
                    f"MFAC: the update's estimated relative error is {error:.2g} (window "
                    f"{self.window_dtype}, damp={self.damp:g}): the window's rounding dominates; "
                    "increase damp or use window_dtype='float64'"
                )

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=4)

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
        stored, scale = self._store(grad[shard.lo : shard.hi])
        x = stored.to(compute_dtype(self.window_dtype))

        filled = min(state["count"], self.ngrads)
        products = torch.empty(filled + 1, dtype=torch.float64, device=rows.device)
        products[:filled] = dots(rows[:filled], stored)
        products[filled] = torch.dot(x, x).double()
        if scale is not None:  # back to the dot products of the unscaled gradients
            products[:filled] *= state["scales"][:filled] * scale
            products[filled] *= scale * scale
        shard.reduce(products)
        finite = torch.isfinite(products).all()
        slot, coef, ok = admit(state, products[:filled], products[filled], self.damp, finite)
        rows[slot] = torch.where(ok, stored, rows[slot])
        w = coef
        if scale is not None:
            state["scales"][slot] = torch.where(ok, scale, state["scales"][slot])
            w = coef * state["scales"][: coef.numel()]
        state["skipped"] += ~ok

        update = shard.gather(combine(rows[: coef.numel()], w).to(grad.dtype))
        self._apply(update, ok)
        error = error_estimate(
            state["gram"],
            coef,
            update.norm(),  # this rank's partition only under ZeRO: a larger estimate
            coef.numel() * self.damp,
            torch.finfo(compute_dtype(self.window_dtype)).eps / 2,
            torch.finfo(self.window_dtype).eps / 2,
        )
        self._check_later(torch.stack([~finite, finite & ~ok, error]).double())
        return loss
