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
        self._prepared = threading.Condition(self._lock)  # notified as each prepared region comes in
        self._closed = False
        self.reused = 0
        self.fresh = 0
        self.prepared = 0
        self._preparing: deque[int] = deque()  # sizes prepare() was asked for, faulted in by one background thread
        self._preparer: threading.Thread | None = None
        self._pending_sizes: list[int] = []  # asked for and not yet idle (queued or being faulted in)

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of `round_up(nbytes)` bytes, aligned as `aligned_empty` aligns it."""
        padded = round_up(nbytes)
        if padded == 0:
            return torch.empty(0, dtype=torch.uint8)
        region = self._take(padded)
        if region is None:
            region = aligned_empty(padded)
        return torch.from_numpy(np.asarray(_Lease(self, region, padded)))

    def prepare(self, nbytes: int) -> None:
        """Have a region for `nbytes` waiting here, its pages already touched, unless one is: a background thread
        faults it in, so the first transfer of that size does not (the kernel zeroing fresh memory on first touch
        made a 342 MiB host-tier reload take 0.5-1 s where a warm one takes 35 ms). Returns at once."""
        padded = round_up(nbytes)
        if padded == 0 or padded > self.max_idle_bytes:
            return
        with self._lock:
            self._settle()
            sizes = [size for size, _ in self._idle] + self._pending_sizes
            if self._closed or any(padded <= size <= padded + padded // 4 for size in sizes):
                return
            self._preparing.append(padded)
            self._pending_sizes.append(padded)
            if self._preparer is None or not self._preparer.is_alive():
                self._preparer = threading.Thread(target=self._prepare_all, name="tiercache-buffers", daemon=True)
                self._preparer.start()

    def _prepare_all(self) -> None:
        while True:
            with self._lock:
                if not self._preparing or self._closed:
                    self._preparing.clear()
                    self._pending_sizes.clear()
                    self._preparer = None
                    self._prepared.notify_all()
                    return
                padded = self._preparing.popleft()
            region: torch.Tensor | None = None
            try:
                region = aligned_empty(padded)
                region.zero_()  # every page touched: faulted in and zeroed here, not in the transfer
            except (MemoryError, RuntimeError):  # no room: the transfer allocates its own, as without prepare()
                region = None
            finally:
                with self._lock:
                    self._pending_sizes.remove(padded)
                    if region is not None and not self._closed:
                        self.prepared += 1
                        self._idle.append((padded, region))
                        self._settle()
                    self._prepared.notify_all()

    def _take(self, padded: int) -> torch.Tensor | None:
        """The smallest idle region that holds `padded` bytes and wastes at most a quarter more (what a tier counts
        is the tensor's bytes, not its region's)."""
        with self._lock:
            # a region being prepared for this size comes sooner than faulting in a fresh one here
            self._prepared.wait_for(lambda: not any(padded <= s <= padded + padded // 4 for s in self._pending_sizes))
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
            self._prepared.notify_all()


T = TypeVar("T")


def _observed(items: Iterable[T], hook: Callable[[], object]) -> Iterator[T]:
    """`items`, with `hook` called after each is looked at (HostBuffers.on_scan)."""
    for item in items:
        yield item
        hook()
