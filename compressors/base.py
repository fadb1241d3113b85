"""What every compressor shares: slots, health flags, batches and the compressor interface.

A compressor is a family of lossy codecs indexed by a *level* (PowerSGD rank,
TopK density, QSGD bits). With error feedback (Seide et al., Interspeech 2014;
Karimireddy et al., ICML 2019) each rank compresses M = g + e and keeps the part
it did not send, e' = M - D(C(M)), for the next step, so nothing is lost: the
applied updates plus the residuals always sum to the true gradients.

Health flags make that hold without the host ever reading a GPU value. Each
rank flags every gradient (`health`: 1 finite and non-zero, 0 all zero, inf not
finite); the flags ride with the exchange's first collective and come back
summed over ranks. From the sum, `outcome` gives each layer's output factor and
whether its residual stays as it was:

    sum in (0, inf)  1/W  (the mean)   residual e'       the normal case
    sum = 0          0    (nothing)    residual e kept   no rank used the parameter
    sum = inf        nan  (poisoned)   residual e kept   some rank's gradient is not finite

A parameter that no rank used this step gets no update from DDP (it drops the
hook's output), so nothing may leave its residual. A non-finite gradient makes
that layer's mean nan on every rank, as a plain all-reduce would make it inf:
`torch.amp.GradScaler` then skips the step, and the residual is untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from .collective import Collective

Level = int | float


@dataclass
class Slot:
    """One parameter's gradient.

    `grad` (any float dtype) receives the all-ranks mean; `m` is this rank's fp32
    M = g + e, which `exchange` turns into the residual e' = M - D(C(M)) in place.
    `seed` seeds randomised codecs (per rank, step, layer).
    """

    name: str
    grad: Tensor
    m: Tensor
    level: Level
    seed: int = 0


class Compressor:
    """A family of codecs; subclasses define the levels, the bytes, the errors and the exchange."""

    name = "compressor"
    # E[decode(encode(M))] = M: the residual is fresh noise every step (L-GreCo pairs it
    # with the step that left it, `adaptive.py`), not a persisting, correlated part of M
    unbiased = False
    default: Level

    def check(self, level: Level) -> Level:
        """Return `level` in canonical form, or raise ValueError naming it."""
        return level

    def candidates(self) -> list[Level]:
        """The levels the L-GreCo controller chooses from, the default among them."""
        return [self.default]

    def compresses(self, shape: torch.Size, level: Level) -> bool:
        """Whether a tensor of `shape` is compressed at `level` (else sent as is)."""
        return True

    def why_not(self, shape: torch.Size, level: Level) -> str:
        """Why a tensor of `shape` is not compressed at `level` (for warnings)."""
        return "sent as is"

    def passes(self, dtype: torch.dtype) -> bool:
        """Whether gradients of `dtype` gain nothing from this codec (sent by plain all-reduce)."""
        return False

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        """Exact bytes one rank hands to the collectives for one tensor at `level`."""
        raise NotImplementedError

    def errors(
        self, a: Tensor, levels: list[Level], name: str = "", residual: Tensor | None = None
    ) -> Tensor:
        """Squared compression error ||a - D(C(a))||^2 of `a` (layer `name`) at each
        level, as one step of this codec would make it (float64). `residual` is the error
        feedback inside a = g + residual (None: none yet), for codecs that judge each level
        at its own residual (QSGD)."""
        raise NotImplementedError

    def exchange(self, slots: list[Slot], comm: Collective, flags: Tensor) -> Tensor:
        """Compress, communicate and decompress the slots; return the summed flags.

        `flags` (fp32, one per slot) is this rank's `health` of each M; it rides
        with the first collective. Each `slot.grad` receives
        factor * sum_w D(C(M_w)), the factor from `outcome`, and `slot.m` the
        residual M - D(C(M)). Randomised codecs draw from `slot.seed`.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


def health(norms: Tensor) -> Tensor:
    """Per-gradient flags from their norms: 1 finite and non-zero, 0 zero, inf not finite."""
    return torch.where(norms.isfinite(), (norms > 0).float(), torch.inf)


def outcome(total: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """(output factor, keep the old residual) per layer from the flags summed over ranks."""
    healthy = (total > 0) & total.isfinite()
    factor = torch.where(total.isfinite(), healthy / world, torch.nan)
    return factor, ~healthy


def batches(slots: list[Slot], key: Callable[[Slot], Hashable]) -> list[tuple[list[Slot], Tensor]]:
    """Runs of consecutive slots with equal `key` whose `m` lie back to back in memory,
    each with a (len(run), *shape) view of their `m`: one batched kernel per run
    instead of one per layer (as torch's PowerSGD hook batches same-shape tensors)."""
    out: list[tuple[list[Slot], Tensor]] = []
    run: list[Slot] = []
    for s in slots:
        if run and key(s) == key(run[0]) and _follows(run[-1].m, s.m):
            run.append(s)
            continue
        if run:
            out.append((run, _stack_view(run)))
        run = [s]
    if run:
        out.append((run, _stack_view(run)))
    return out


def _follows(a: Tensor, b: Tensor) -> bool:
    """`b` starts where contiguous `a` ends, in the same storage, with the same shape."""
    return (
        a.is_contiguous()
        and b.is_contiguous()
        and a.shape == b.shape
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
    )


def _stack_view(run: list[Slot]) -> Tensor:
    first = run[0].m
    if len(run) == 1:
        return first.unsqueeze(0)
    return first.as_strided((len(run), *first.shape), (first.numel(), *first.stride()))


def host_reads_free(device: torch.device) -> bool:
    """Whether the host may read a tensor's value for free (the CPU) rather than wait for
    the device (a GPU): the hot path branches on values only where it is."""
    return device.type == "cpu"


def norms64(grads: list[Tensor]) -> list[Tensor]:
    """Each gradient's 2-norm as a float64 0-d tensor, exact at both ends of the range.

    fp32 squares of entries below ~1e-19 underflow and above ~1e19 overflow, so an fp32
    norm can be 0 for a gradient that is not (`health` would take it for unused) or inf
    for a finite one. On the CPU, fp32 gradients take the fp32 kernel (about 7x faster
    than converting them to float64) and the few norms that came out 0 or not finite
    are taken again in float64: reading them is free there. Elsewhere every norm is
    accumulated in float64 on the device, so the host never waits."""
    if not host_reads_free(grads[0].device) or any(g.dtype != torch.float32 for g in grads):
        return torch._foreach_norm(grads, 2, dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm(grads, 2)).double()
    for i in ((norms == 0) | ~norms.isfinite()).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(grads[i], dtype=torch.float64)
    return list(norms.unbind())


def square_norm(a: Tensor, dim: int | None = None) -> Tensor:
    """sum a^2 (over `dim`, else all), accumulated in float64 without a float64 copy of `a`
    (a large one costs a fresh allocation and its page faults on every call)."""
    return torch.linalg.vector_norm(a, dim=dim, dtype=torch.float64).square()


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer >= 1")
    return value
