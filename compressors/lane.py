"""A single worker thread that runs bucket jobs, and all their collectives, in order.

DDP calls a comm hook from the autograd thread as each bucket becomes ready and
keeps computing while earlier buckets communicate. A protocol with several
rounds (PowerSGD's P then Q, a non-finite fallback, a controller decision) that
issues its later collectives from future callbacks lets ranks interleave the
rounds of different buckets in different orders, and the collectives no longer
match (the gloo "size mismatch" seen with torch's PowerSGD hook on slow links).
Here every job runs start to finish on one FIFO thread per hook state, so every
rank issues the same collectives in the same order while backward goes on.

On CUDA the job runs on a side stream that first waits for the gradients, and
its future carries the stream's completion to whoever waits on it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

import torch

CLOSE_TIMEOUT_S = 60.0


class Lane:
    """Runs submitted jobs one after another on a daemon thread."""

    def __init__(self, name: str = "gradlane-comm"):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def submit(self, job: Callable[[], torch.Tensor], device: torch.device) -> torch.futures.Future:
        """Queue `job`; the returned future completes with its result (or its exception)."""
        if device.type == "cuda":
            future = torch.futures.Future(devices=[device])
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        else:
            future, ready = torch.futures.Future(), None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((job, device, ready, future))
        return future

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the thread once the queued jobs are done. Call it before the interpreter
        exits: a thread still parked then makes the process abort at exit now and then.
        A job stuck longer than `timeout_s` (a collective whose peers are gone) raises
        TimeoutError instead of hanging."""
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return
        self._jobs.put(None)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(
                f"{self.name}: a comm job did not finish within {timeout_s:g} s of close() "
                "(a collective is stuck: has a rank stopped or died?)"
            )

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, device, ready, future = item
            try:
                with torch.no_grad(), self._stream(device, ready):
                    future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def _stream(self, device: torch.device, ready) -> contextlib.AbstractContextManager:
        if device.type != "cuda":
            return contextlib.nullcontext()
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        stream = self._streams[device]
        stream.wait_event(ready)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack
