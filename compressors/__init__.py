"""Layerwise gradient compression: PowerSGD, TopK, QSGD and 16-bit casts with error
feedback, the L-GreCo controller that picks each layer's level, the engine-neutral
`GradientExchange` and the DDP comm hook built on it.

    from gradlane.compressors import LGrecoState, PowerSGD, lgreco_hook
    ddp_model.register_comm_hook(LGrecoState(model, PowerSGD(rank=4)), lgreco_hook)

The math talks only to a `Collective` (all-reduce, all-gather, broadcast, rank,
world size, byte counters); `TorchCollective` is its torch.distributed transport.
"""

from .adaptive import Controller, choose, fitted, knapsack
from .base import Compressor, Slot
from .cast import Cast
from .collective import Collective, TorchCollective, plain_mean
from .exchange import GradientExchange
from .hook import CompressionState, LGrecoState, compression_hook, lgreco_hook
from .powersgd import PowerSGD, orthogonalize
from .qsgd import QSGD, pack_bits, unpack_bits
from .topk import TopK

__all__ = [
    "QSGD",
    "Cast",
    "Collective",
    "CompressionState",
    "Compressor",
    "Controller",
    "GradientExchange",
    "LGrecoState",
    "PowerSGD",
    "Slot",
    "TopK",
    "TorchCollective",
    "choose",
    "compression_hook",
    "fitted",
    "knapsack",
    "lgreco_hook",
    "orthogonalize",
    "pack_bits",
    "plain_mean",
    "unpack_bits",
]
