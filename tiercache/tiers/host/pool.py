"""The host pool: the host tier's memory, allocated once when the cache opens and reused for every entry.

One region of `tiers.host.capacity` bytes, page-locked with `cudaHostRegister` where CUDA works (DMA runs at full
link speed only from pinned memory, and pinning per transfer costs more than the copy), handed out in 512-byte-aligned
extents. A tensor gets one extent when a free run is large enough, else several (so fragmentation costs no
capacity); extents freed while a copy may still read or write them return to the pool only once that copy's event
is done. When the pool cannot serve a request (pinning unavailable, or free space split into too little) the caller
falls back to pageable memory and records the pathway as such.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CapacityError
from ...io.aligned import aligned_empty, round_up
from ...policy.machine import available_ram as machine_ram
from ...transfer import Deferred
from ...units import format_size

# Extents start and end on 512 bytes: enough for full-speed DMA, and small tensors waste at most 511 bytes each
# (4 KiB grains made a pool of many small tensors overflow into pageable memory long before its budget was used).
GRAIN = 512


@dataclass(frozen=True)
class Extent:
    """`nbytes` of the pool's region from `offset`."""

    offset: int
    nbytes: int


class HostPool:
    """A fixed region of host memory handed out in extents. Thread-safe."""

    def __init__(
        self,
        capacity: int,
        *,
        pin: bool,
        deferred: Deferred | None = None,
        available_ram: Callable[[], int | None] | None = None,
    ) -> None:
        """`available_ram` says how many bytes of RAM this process could still get (default: what the kernel and
        a cgroup limit say); pinning more than half of it is refused."""
        self.capacity = round_up(capacity, GRAIN)
        available_ram = available_ram or machine_ram
        available = available_ram() if self.capacity else None
        if available is not None and self.capacity > available:
            raise CapacityError(_above_ram(self.capacity, f"this machine has {format_size(available)} available"))
        try:
            self.region = aligned_empty(self.capacity) if self.capacity else torch.empty(0, dtype=torch.uint8)
        except RuntimeError as exc:  # the allocator refused: overcommit off, or a limit we could not read
            raise CapacityError(_above_ram(self.capacity, f"allocating it failed ({exc})")) from None
        self.deferred = deferred if deferred is not None else Deferred()
        self.pinned, self.why_pageable = _pin(self.region, pin, available)
        self.used = 0  # bytes handed out, in whole grains
        self.fallbacks = 0  # requests the pool could not serve (served from pageable memory instead)
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, nbytes)
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        with self._lock:
            return max((n for _, n in self._free), default=0)

    @property
    def free_runs(self) -> int:
        """How many separate free runs the pool is split into (1 = not fragmented)."""
        return len(self._free)

    def allocate(self, nbytes: int) -> list[Extent] | None:
        """Extents holding `nbytes` (rounded up to the grain), one if a free run is large enough; None when the pool
        cannot hold them even after every pending release has run (the caller then uses pageable memory)."""
        if nbytes <= 0:
            return []
        self.deferred.collect()
        while True:
            with self._lock:
                extents = self._take(round_up(nbytes, GRAIN))
            if extents is not None:
                return extents
            if not self.deferred.settle():  # nothing left in flight that would free more
                self.fallbacks += 1
                return None

    def release(self, extents: list[Extent]) -> None:
        """Give extents back at once: no copy may be using them (use `release_after` otherwise)."""
        with self._lock:
            for extent in extents:
                self._give_back(extent)

    def release_after(self, event: object, extents: list[Extent]) -> None:
        """Give extents back once `event` (a transfer.Event) is done."""
        self.deferred.after(event, lambda: self.release(extents))  # type: ignore[arg-type]

    def view(self, extent: Extent) -> torch.Tensor:
        """The extent's bytes as a uint8 tensor sharing the pool's memory."""
        return self.region[extent.offset : extent.offset + extent.nbytes]

    def close(self) -> None:
        self.deferred.settle_all()
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.region.data_ptr())
            self.pinned = False
        self.region = torch.empty(0, dtype=torch.uint8)  # the memory goes now, not when a cycle is collected
        self._free, self.capacity, self.used = [], 0, 0

    # ---- the free list: runs sorted by offset, neighbours merged -----------------------------------------------
    def _take(self, need: int) -> list[Extent] | None:
        if need > self.capacity - self.used:
            return None
        fits = [i for i, (_, n) in enumerate(self._free) if n >= need]
        if fits:  # best fit: the smallest run that holds it all keeps large runs for large tensors
            order = [min(fits, key=lambda i: self._free[i][1])]
        else:  # span several runs, largest first: as few extents as possible
            order = sorted(range(len(self._free)), key=lambda i: -self._free[i][1])
        extents = []
        for i in order:
            offset, n = self._free[i]
            take = min(n, need)
            extents.append(Extent(offset, take))
            need -= take
            if need == 0:
                break
        for extent in extents:
            self._carve(extent)
        self.used += sum(e.nbytes for e in extents)
        return extents

    def _carve(self, extent: Extent) -> None:
        i = bisect.bisect_right(self._free, (extent.offset, float("inf"))) - 1
        offset, n = self._free[i]
        rest = (extent.offset + extent.nbytes, offset + n - extent.offset - extent.nbytes)
        self._free[i : i + 1] = [rest] if rest[1] else []

    def _give_back(self, extent: Extent) -> None:
        i = bisect.bisect_left(self._free, (extent.offset, 0))
        start, end = extent.offset, extent.offset + extent.nbytes
        if (
            i > 0
            and self._free[i - 1][0] + self._free[i - 1][1] > start
            or i < len(self._free)
            and self._free[i][0] < end
        ):
            raise RuntimeError(f"host pool: extent {extent} released twice or overlaps a free run")
        if i < len(self._free) and self._free[i][0] == end:  # merge with the run after
            end += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:  # and with the run before
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end - start))
        self.used -= extent.nbytes


def pieces(extents: list[Extent], nbytes: int, start: int = 0) -> list[tuple[int, int, int]]:
    """How the bytes [start, start + nbytes) of an allocation lie in its extents, in order: (offset from `start`,
    pool offset, length)."""
    out = []
    base = 0  # the allocation's offset at which the current extent begins
    for extent in extents:
        lo, hi = max(start, base), min(start + nbytes, base + extent.nbytes)
        if lo < hi:
            out.append((lo - start, extent.offset + lo - base, hi - lo))
        base += extent.nbytes
    return out


def _above_ram(capacity: int, why: str) -> str:
    return (
        f"the host tier's pool of {format_size(capacity)} ({capacity} bytes) cannot be had: {why}. Lower "
        "tiers.host.capacity in the policy below the RAM this process can use"
    )


def _pin(region: torch.Tensor, pin: bool, available: int | None) -> tuple[bool, str | None]:
    """Page-lock the region once; returns (pinned, why not)."""
    if not pin:
        return False, "pinning is off (tiers.host.pinned = false, or the compute device is the CPU)"
    if not torch.cuda.is_available():
        return False, "CUDA is not available, so there is nothing to pin for"
    if region.numel() == 0:
        return False, "the host tier has no capacity"
    if available is not None and region.numel() > available // 2:
        # Pinned pages can never be swapped or reclaimed: a pool near the machine's free memory gets the process
        # killed by the OOM killer, not an error.
        return False, (
            f"pinning {region.numel()} bytes would lock more than half of the {available} bytes of RAM available; "
            "lower tiers.host.capacity in the policy to pin it"
        )
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(region.data_ptr(), region.numel(), 0))
    if error:
        # The failure stays as CUDA's last error and would fail the next kernel launch: clear it.
        _clear_cuda_error(cudart)
        return False, f"cudaHostRegister of {region.numel()} bytes failed with cudaError {error}"
    return True, None


def _clear_cuda_error(cudart: object) -> None:
    """cudaGetLastError(), from torch's binding if it has one, else from the libcudart torch loaded."""
    clear = getattr(cudart, "cudaGetLastError", None)
    if clear is not None:
        clear()
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    for path in sorted({line.split()[-1] for line in maps.splitlines() if "libcudart.so" in line}):
        try:
            ctypes.CDLL(path).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
