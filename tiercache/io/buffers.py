"""Host buffers that are reused once nothing uses them, so that reading an entry from nvme, or reloading it from
the host tier into CPU memory, does not fault in and zero fresh memory every time.

The kernel zeroes every page of a fresh allocation on first touch: on the CI-class VM that cost 20 ms of wall time
and as much CPU time for a 128 MiB read that took 43 ms into memory already touched (64 ms into fresh memory).
glibc returns blocks above its mmap threshold (at most 32 MiB) to the kernel when they are freed, so each large
transfer paid it again.

A buffer handed out here is a tensor whose memory belongs to a lease: numpy holds the lease as its array's base
and torch holds the array, so the lease dies only when the last tensor or view of that memory is gone, whatever
the caller did with it (kept it in a tier, sliced it, exported it). Its region then comes back here and is lent
again to a transfer it holds with at most a quarter to spare. At most `max_idle` regions and `max_idle_bytes`
wait here; older ones are freed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from .aligned import aligned_empty, round_up


class _Lease:
    """The owner of one region while tensors use it; hands the region back when it is collected."""

    def __init__(self, pool: HostBuffers, region: torch.Tensor, nbytes: int) -> None:
        self._returned = pool.returned
        self._region = region
        self.__array_interface__: dict[str, Any] = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (region.data_ptr(), False),
            "version": 3,
        }

    def __del__(self) -> None:
        # Only an append: a lease may be collected by the cyclic GC in any thread at any point, even while the pool
        # is scanning its idle list in this very thread; the pool moves returned regions in under its lock.
        self._returned.append(self._region)


class HostBuffers:
    """Page-aligned uint8 host buffers for transfers, their regions reused once no tensor uses them.

    `on_scan` (default None) is a seam for tests: called while a request scans the idle regions, after each region
    it looked at, under the pool's lock, in the requesting thread. Whatever it does (run the cyclic GC, which may
    collect a lease there) is what could happen at that point anyway; the pool must lend correctly regardless.
    """

    def __init__(
        self, max_idle: int = 4, max_idle_bytes: int = 1 << 30, *, on_scan: Callable[[], object] | None = None
    ) -> None:
        self.max_idle = max_idle
        self.max_idle_bytes = max_idle_bytes
        self.on_scan = on_scan
        self.returned: deque[torch.Tensor] = deque()  # regions whose leases died (deque.append is atomic)
        self._idle: list[tuple[int, torch.Tensor]] = []  # (bytes, region), oldest first; changed under _lock only
        self._lock = threading.Lock()
        self._closed = False
        self.reused = 0
        self.fresh = 0

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of `round_up(nbytes)` bytes, aligned as `aligned_empty` aligns it."""
        padded = round_up(nbytes)
        if padded == 0:
            return torch.empty(0, dtype=torch.uint8)
        region = self._take(padded)
        if region is None:
            region = aligned_empty(padded)
        return torch.from_numpy(np.asarray(_Lease(self, region, padded)))

    def _take(self, padded: int) -> torch.Tensor | None:
        """The smallest idle region that holds `padded` bytes and wastes at most a quarter more (what a tier counts
        is the tensor's bytes, not its region's)."""
        with self._lock:
            self._settle()
            idle = self._idle if self.on_scan is None else _observed(self._idle, self.on_scan)
            fits = [(size, i) for i, (size, _) in enumerate(idle) if padded <= size <= padded + padded // 4]
            if not fits:
                self.fresh += 1
                return None
            self.reused += 1
            return self._idle.pop(min(fits)[1])[1]

    def _settle(self) -> None:
        """Move returned regions into the idle list, then free the oldest beyond the limits (under _lock)."""
        while self.returned:
            region = self.returned.popleft()
            if not self._closed:
                self._idle.append((region.numel(), region))
        while len(self._idle) > self.max_idle or sum(size for size, _ in self._idle) > self.max_idle_bytes:
            self._idle.pop(0)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            self._settle()
            return sum(size for size, _ in self._idle)

    def close(self) -> None:
        """Free the idle regions; buffers still in use are freed when their last tensor is."""
        with self._lock:
            self._closed = True
            self._settle()
            self._idle.clear()


T = TypeVar("T")


def _observed(items: Iterable[T], hook: Callable[[], object]) -> Iterator[T]:
    """`items`, with `hook` called after each is looked at (HostBuffers.on_scan)."""
    for item in items:
        yield item
        hook()
