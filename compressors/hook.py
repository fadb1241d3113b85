"""The DDP comm hook: a thin adapter that runs `GradientExchange.average` per bucket.

    state = CompressionState(model, PowerSGD(rank=4))
    ddp_model.register_comm_hook(state, compression_hook)

or with each layer's level chosen by the L-GreCo controller:

    state = LGrecoState(model, PowerSGD(rank=4), alpha=1.0)
    ddp_model.register_comm_hook(state, lgreco_hook)

Each bucket is queued on the state's comm lane (one thread, see `lane.py`) and
averaged there over a `TorchCollective`. Unless given one, a state makes its own
process group over the default group's ranks, so its collectives never
interleave with others that other code (SyncBatchNorm, tensor-parallel layers,
another DDP model) issues on the default group during backward. The group is
made when the state is built, or at the first bucket when torch.distributed
was not yet initialised then; every rank builds its states in the same order.
Any other `Collective` passed as `process_group` is used as it is (that is how
the DeepSpeed and Horovod engines reuse the registry's hook settings).
"""

import weakref

import torch
import torch.distributed as dist
from torch import nn

from .adaptive import Controller
from .base import Compressor, Level
from .collective import Collective, TorchCollective
from .exchange import GradientExchange
from .lane import CLOSE_TIMEOUT_S, Lane


class CompressionState(GradientExchange):
    """Hook state: a GradientExchange fed by DDP's buckets on a comm lane.

    The process group is used, never saved: `state_dict()` holds tensors and numbers only.
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: Compressor,
        process_group: dist.ProcessGroup | Collective | None = None,
        start_iter: int = 0,
        seed: int = 0,
        controller: Controller | None = None,
    ):
        super().__init__(model, compressor, None, start_iter, seed, controller)
        self.process_group = None if isinstance(process_group, Collective) else process_group
        if isinstance(process_group, Collective):
            self.collective = process_group
        elif dist.is_available() and dist.is_initialized():
            self.collective = self._own_collective(process_group)
        self._names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self._lane = Lane()
        self._finalizer = weakref.finalize(
            self, self._lane.close
        )  # when the state goes, or at exit

    def submit(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """Queue the bucket on the comm lane; the future yields its averaged buffer. A job
        that raised stops the state: later buckets raise here, in backward."""
        self.check_alive()
        if self.collective is None:
            self.collective = self._own_collective(self.process_group)
        buffer = bucket.buffer()
        names = [self._names[id(p)] for p in bucket.parameters()]
        grads, last = bucket.gradients(), bucket.is_last()

        def job():
            self.average(names, grads, buffer, last)
            return buffer

        future = self._lane.submit(job, buffer.device)
        if last:
            # DDP issues its own collectives on the same group as soon as the last hook
            # returns (the unused-parameter bitmap): ours must all be issued by then, on
            # every rank, or the two streams interleave differently. Backward is done by
            # now and DDP would wait for the buckets anyway, so nothing is lost.
            future.wait()
        return future

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the comm thread (it also stops when the state is collected, or at exit);
        TimeoutError when a job is stuck longer than `timeout_s`."""
        self._finalizer.detach()
        self._lane.close(timeout_s)

    def _own_collective(self, group: dist.ProcessGroup | None) -> TorchCollective:
        """`group`, else a new group over every rank (a collective call)."""
        self.process_group = group if group is not None else dist.new_group(timeout=_timeout())
        return TorchCollective(self.process_group)


class LGrecoState(CompressionState):
    """CompressionState whose per-layer levels L-GreCo re-chooses every `adjust_every` steps.

    After `start_iter` plain all-reduce steps, each decision measures every
    candidate level's error on the last `accumulate` steps' gradients and picks the
    fewest bytes whose total error stays within alpha x that of the uniform default
    (see `gradlane.compressors.adaptive`)."""

    def __init__(
        self,
        model: nn.Module,
        compressor: Compressor,
        process_group: dist.ProcessGroup | None = None,
        start_iter: int = 10,
        adjust_every: int = 100,
        accumulate: int = 3,
        alpha: float = 1.0,
        bins: int = 10000,
        candidates: list[Level] | None = None,
        seed: int = 0,
    ):
        controller = Controller(
            compressor, start_iter, adjust_every, accumulate, alpha, bins, candidates
        )
        super().__init__(model, compressor, process_group, start_iter, seed, controller)


def _timeout():
    """The default group's timeout, for our own group (new_group would use 30 min)."""
    group = dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):  # no backend for that device, or no options
            continue
    return None


def compression_hook(
    state: CompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compress the bucket layer by layer and average it over ranks.

    (No postponed annotations in this module: DDP checks these two at registration.)"""
    return state.submit(bucket)


lgreco_hook = compression_hook  # the same hook; an LGrecoState is what makes it adaptive
