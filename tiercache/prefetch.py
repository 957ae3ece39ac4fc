"""PrefetchHandle: what `TierCache.prefetch` returns, a load running in the background."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch

from .entry import Tensors
from .transfer import Event, Transfers, consumer_stream


class PrefetchHandle:
    """A load running in the background. `wait()` returns the tensors, or raises what the load raised."""

    def __init__(self, key: str, future: Future[tuple[Tensors, Event]], device: torch.device, transfers: Transfers):
        self.key = key
        self.device = device
        self._future = future
        self._transfers = transfers

    def done(self) -> bool:
        """Whether wait() would return (or raise) without waiting."""
        if not self._future.done():
            return False
        return self._future.exception() is not None or self._future.result()[1].query()

    def wait(self, timeout: float | None = None, *, stream: Any = None) -> Tensors:
        """The tensors. Without `stream`, the calling thread blocks until they hold their values. With `stream` (a
        torch.cuda.Stream, or a tiercache Stream), that stream is made to wait for the copies instead and the host
        does not block on them (only on the load having been started, e.g. its nvme read): use the tensors on
        that stream. `timeout` bounds the wait for the load to start, in seconds."""
        tensors, ready = self._future.result(timeout)
        if stream is None:
            ready.synchronize()
        self._transfers.deliver(tensors.values(), ready, consumer_stream(self.device, stream))
        return tensors
