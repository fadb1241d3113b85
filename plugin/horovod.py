"""Horovod glue: a drop-in `DistributedOptimizer` with gradlane's compressors, the
compressors' collectives over Horovod, and Horovod started inside processes that
already share a torch.distributed group (Ray Train workers).

    import gradlane.horovod as ghvd
    hvd.init()                          # or ghvd.init_from_torch() inside Ray Train
    optimizer = ghvd.DistributedOptimizer(
        optimizer, model.named_parameters(), compression="powersgd", rank=8
    )

`DistributedOptimizer` averages the gradients over Horovod ranks in `step()`
(or an explicit `synchronize()`), through the same `GradientExchange` as the DDP
comm hook: PowerSGD all-reduces its factors, TopK and QSGD all-gather their
payloads, fp16/bf16 all-reduce 16-bit values, all with error feedback, and
`lgreco` re-chooses each layer's level. `compression="none"` is a plain Horovod
all-reduce (average).

`init_from_torch` is the Gloo rendezvous that `horovodrun` would do: rank 0 of the
torch group starts Horovod's HTTP rendezvous server, its port is broadcast over
the torch group, and every rank calls `hvd.init()` with the slot it was given
(rank, local rank on its host, cross rank among hosts), so Horovod's ranks are the
torch ranks. Horovod is imported lazily; build it with `make horovod`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradlane.compressors import Collective
from gradlane.compressors.collective import plain_mean

_rendezvous: Any = None  # rank 0's rendezvous server, kept until shutdown()


def _slots(hosts: list[str]) -> list[dict[str, Any]]:
    """Horovod's slot of every rank from each rank's host name (ranks keep their order):
    local rank = earlier ranks on the same host; cross rank = index of the host among
    the hosts that have a slot with that local rank."""
    order = list(dict.fromkeys(hosts))
    local_size = {h: hosts.count(h) for h in order}
    slots, seen = [], dict.fromkeys(order, 0)
    for rank, host in enumerate(hosts):
        local_rank = seen[host]
        seen[host] += 1
        cross_hosts = [h for h in order if local_size[h] > local_rank]
        slots.append(
            {
                "hostname": host,
                "rank": rank,
                "size": len(hosts),
                "local_rank": local_rank,
                "local_size": local_size[host],
                "cross_rank": cross_hosts.index(host),
                "cross_size": len(cross_hosts),
            }
        )
    return slots


def _route(address: str) -> tuple[str, str]:
    """(local IPv4 address, interface name) this process uses to reach `address`."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))  # no packet is sent: this only picks the route
        local = s.getsockname()[0]
    for iface, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return local, iface
    raise RuntimeError(f"no network interface holds {local}, the route to {address}")


def init_from_torch(timeout_s: int = 60) -> None:
    """Initialise Horovod (Gloo controller and CPU operations) on the ranks of the default
    torch.distributed group, with Horovod rank = torch rank. A no-op when already done."""
    global _rendezvous
    import horovod.torch as hvd

    if hvd.is_initialized():
        return
    if not dist.is_initialized():
        raise RuntimeError("init_from_torch needs an initialised torch.distributed group")
    rank, world = dist.get_rank(), dist.get_world_size()
    box: list[Any] = [os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())]
    dist.broadcast_object_list(box, src=0)  # rank 0's view of its address is the one to use
    server_addr = box[0]
    _, iface = _route(server_addr)
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    slots = _slots(hosts)

    port: list[Any] = [None]
    if rank == 0:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousServer

        _rendezvous = RendezvousServer()
        port[0] = _rendezvous.start()
        _rendezvous.init([SlotInfo(**s) for s in slots])
    dist.broadcast_object_list(port, src=0)
    mine = slots[rank]
    os.environ.update(
        HOROVOD_GLOO_RENDEZVOUS_ADDR=server_addr,
        HOROVOD_GLOO_RENDEZVOUS_PORT=str(port[0]),
        HOROVOD_CONTROLLER="gloo",
        HOROVOD_CPU_OPERATIONS="gloo",
        HOROVOD_GLOO_IFACE=iface,
        HOROVOD_GLOO_TIMEOUT_SECONDS=str(timeout_s),
        HOROVOD_HOSTNAME=mine["hostname"],
        **{f"HOROVOD_{k.upper()}": str(v) for k, v in mine.items() if k != "hostname"},
    )
    hvd.init()
    if (hvd.rank(), hvd.size()) != (rank, world):
        raise RuntimeError(f"horovod started as rank {hvd.rank()} of {hvd.size()}, "
                           f"not {rank} of {world}")  # fmt: skip


def shutdown() -> None:
    """Shut Horovod down (and rank 0's rendezvous server)."""
    global _rendezvous
    import horovod.torch as hvd

    if hvd.is_initialized():
        hvd.shutdown()
    if _rendezvous is not None:
        _rendezvous.stop()
        _rendezvous = None


class _Handle:
    """An outstanding Horovod operation, waited on like a torch.distributed Work."""

    def __init__(self, handle: int):
        self._handle = handle

    def wait(self) -> None:
        import horovod.torch as hvd

        hvd.synchronize(self._handle)


class _Done:
    """A finished operation."""

    def wait(self) -> None:
        return None


# what Horovod 0.28's torch all-reduce accepts; all-gather takes any integer type as well
REDUCIBLE = (torch.int32, torch.int64, torch.float16, torch.float32, torch.float64)
SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class HorovodCollective(Collective):
    """The compressors' collectives through Horovod on `process_set` (default: all ranks):
    all-reduce sums, all-gather stacks every rank's tensor, broadcast copies set rank 0's.

    Horovod 0.28 cannot all-reduce bfloat16: such a tensor is all-gathered (as int16
    bits) and summed locally, and counted as the all-gather it is. CUDA tensors need a
    Horovod built with NCCL (`HOROVOD_GPU_OPERATIONS=NCCL make horovod`)."""

    def __init__(self, process_set=None):
        import horovod.torch as hvd

        self.process_set = process_set or hvd.global_process_set
        super().__init__(self.process_set.rank(), self.process_set.size())

    def all_reduce(self, t: Tensor, async_op: bool = False) -> _Handle | _Done | None:
        if t.dtype in REDUCIBLE:
            return super().all_reduce(t, async_op)
        t.copy_(self.all_gather(t).sum(0))
        return _Done() if async_op else None

    def _all_reduce(self, t: Tensor, async_op: bool) -> _Handle | None:
        import horovod.torch as hvd

        work = _Handle(hvd.allreduce_async_(t, op=hvd.Sum, process_set=self.process_set))
        if async_op:
            return work
        work.wait()
        return None

    def _all_gather(self, t: Tensor) -> Tensor:
        import horovod.torch as hvd

        bits = t.view(SAME_SIZE_INT[t.element_size()]) if t.is_floating_point() else t
        rows = hvd.allgather(bits.unsqueeze(0), process_set=self.process_set)
        return rows.view(t.dtype)

    def _broadcast(self, t: Tensor) -> None:
        import horovod.torch as hvd

        root = self.process_set.ranks[0] if self.process_set.ranks else 0
        hvd.broadcast_(t, root_rank=root, process_set=self.process_set)


class _Named:
    """What an exchange reads of a model: its named parameters."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self._named = named

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._named)


class DistributedOptimizer(torch.optim.Optimizer):
    """`optimizer` whose `step()` first averages the gradients over Horovod ranks.

    A drop-in for `horovod.torch.DistributedOptimizer(optimizer, named_parameters)`:
    `compression` is a gradlane comm hook name ("none", "fp16", "bf16", "powersgd",
    "topk", "qsgd", "lgreco") and `settings` its parameters (as `comm.*` in a config,
    e.g. rank=8, density=0.01, bits=4). It shares `param_groups` and `state` with
    `optimizer`, so learning-rate schedulers work on either. Every rank must step
    together; a parameter without a gradient on this rank contributes zeros.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        compression: str = "none",
        process_set=None,
        **settings: Any,
    ):
        from .comm import build_exchange

        named = list(named_parameters)
        _check_names(optimizer, named)
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups, self.state = optimizer.param_groups, optimizer.state
        self.optimizer = optimizer
        self.compression = compression
        self._named = [(n, p) for n, p in named if p.requires_grad]
        self.collective = HorovodCollective(process_set)
        cfg = {"hook": compression, **settings}
        self.exchange = build_exchange(_Named(self._named), cfg, self.collective)
        self._synchronized = False
        self._plain_bytes = 0.0

    def synchronize(self) -> None:
        """Average the gradients over ranks now (e.g. before clipping them)."""
        for _, p in self._named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        names = [n for n, _ in self._named]
        grads = [p.grad for _, p in self._named]
        if self.exchange is not None:
            self.exchange.average(names, grads)
        else:
            before = self.collective.payload
            plain_mean(self.collective, grads)
            self._plain_bytes = float(self.collective.payload - before)
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside, `step()` does not average again (call `synchronize()` yourself first)."""
        self._synchronized = True
        try:
            yield
        finally:
            self._synchronized = False

    def step(self, closure=None):
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        exchange = self.exchange.state_dict() if self.exchange is not None else {}
        return {"optimizer": self.optimizer.state_dict(), "exchange": exchange}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        # torch's load_state_dict makes new group dicts: share them again (schedulers)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        if self.exchange is not None:
            self.exchange.load_state_dict(state["exchange"])

    def metrics(self) -> dict[str, float]:
        """The last step's bytes (and, with compression, its ratio and error)."""
        if self.exchange is not None:
            return self.exchange.metrics()
        return {"comm/bytes_per_step": self._plain_bytes}

    def save_artifacts(self, outdir: Path) -> None:
        """The exchange's plots (`comm_levels.png`), when compressing."""
        if self.exchange is not None:
            self.exchange.save_artifacts(outdir)


def _check_names(optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]) -> None:
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"named_parameters repeats names: {', '.join(twice)}")
    known = {id(p) for _, p in named}
    unnamed = sum(id(p) not in known for g in optimizer.param_groups for p in g["params"])
    if unnamed:
        raise ValueError(f"named_parameters misses {unnamed} of the optimizer's parameters")
