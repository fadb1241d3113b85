"""Layerwise gradient compression for DDP: PowerSGD, TopK, QSGD and 16-bit casts with
error feedback, the L-GreCo controller that picks each layer's level, and the comm hook.

    from gradlane.compressors import LGrecoState, PowerSGD, lgreco_hook
    ddp_model.register_comm_hook(LGrecoState(model, PowerSGD(rank=4)), lgreco_hook)
"""

from .adaptive import Controller, choose, knapsack
from .base import Compressor, Slot
from .cast import Cast
from .hook import CompressionState, LGrecoState, compression_hook, lgreco_hook
from .powersgd import PowerSGD, orthogonalize
from .qsgd import QSGD, pack_bits, unpack_bits
from .topk import TopK
from .wire import Comm

__all__ = [
    "QSGD",
    "Cast",
    "Comm",
    "CompressionState",
    "Compressor",
    "Controller",
    "LGrecoState",
    "PowerSGD",
    "Slot",
    "TopK",
    "choose",
    "compression_hook",
    "knapsack",
    "lgreco_hook",
    "orthogonalize",
    "pack_bits",
    "unpack_bits",
]
