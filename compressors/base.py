"""What every compressor shares: the slot a bucket is cut into and the compressor interface.

A compressor is a family of lossy codecs indexed by a *level* (PowerSGD rank,
TopK density, QSGD bits). With error feedback (Seide et al., Interspeech 2014;
Karimireddy et al., ICML 2019) each rank compresses M = g + e and keeps the part
it did not send, e' = M - D(C(M)), for the next step, so nothing is lost: the
applied updates plus the residuals always sum to the true gradients.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .collective import Collective

Level = int | float


@dataclass
class Slot:
    """One parameter's gradient inside a DDP bucket.

    `grad` is the bucket's view (any float dtype) and receives the all-ranks mean;
    `m` is this rank's fp32 M = g + e, which `exchange` turns into the residual
    e' = M - D(C(M)) in place. `seed` seeds randomised codecs (per rank, step, layer).
    """

    name: str
    grad: Tensor
    m: Tensor
    level: Level
    seed: int = 0


class Compressor:
    """A family of codecs; subclasses define the levels, the bytes, the errors and the exchange."""

    name = "compressor"
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

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        """Exact bytes one rank hands to the collectives for one tensor at `level`."""
        raise NotImplementedError

    def errors(self, a: Tensor, levels: list[Level]) -> Tensor:
        """Squared compression error ||a - D(C(a))||^2 of `a` at each level (float64)."""
        raise NotImplementedError

    def exchange(self, slots: list[Slot], comm: Collective, bad: Tensor) -> bool:
        """Compress, communicate and decompress one bucket.

        Writes the mean over ranks into each `slot.grad` and the residual into
        `slot.m`. `bad` (a bool tensor) says this rank's gradients are not finite;
        it rides along with the first collective, and when any rank raised it the
        exchange stops and returns False on every rank before writing any `grad`
        (`slot.m` is scratch: the caller keeps the old residual).
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer >= 1")
    return value
