"""The host tier: entries' bytes in the host pool (pinned where CUDA works), moved by the copy streams.

Offloads (`put`) copy device->host on the offload stream after the producer's work; reloads (`load`) copy
host->device on the reload stream after the offload that filled the extents. Extents go back to the pool only once
every copy that touches them is done, so a buffer is never reused while a copy from or into it is in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...entry import EntrySpec, Tensors, as_bytes, from_bytes
from ...io.aligned import round_up
from ...policy.schema import HostBudget, TierBudget
from ...transfer import Event, Stream, Transfers, all_of, consumer_stream
from ...units import format_size
from ..base import DataPath, EntryId, Load, Tier, TierState, select
from .pool import Extent, HostPool, pieces

Home = list[Extent] | torch.Tensor  # an entry's bytes: extents of the pool, or pageable memory when the pool is full
ALIGN = 64  # each tensor starts this aligned in its entry's bytes: any dtype can view it; a cache line


@dataclass
class _Held:
    spec: EntrySpec
    home: Home
    offsets: list[int]  # where each tensor starts in the entry's bytes
    span: int  # the entry's bytes, padding between tensors included
    ready: Event  # the offload that filled it
    reads: list[Event] = field(default_factory=list)  # reloads from it that may still be in flight


def entry_layout(spec: EntrySpec) -> tuple[list[int], int]:
    """Each tensor's offset in one run of bytes holding the entry, and the run's length."""
    offsets, span = [], 0
    for tspec in spec.tensors:
        offsets.append(span)
        span += round_up(tspec.nbytes, ALIGN)
    return offsets, span


class HostTier(Tier):
    """An entry lives in one run of the pool (several extents where the pool is fragmented), its tensors at
    64-byte offsets: a whole-entry reload is one copy (in `transfer.chunk_size` pieces), not one per tensor."""

    def __init__(self, name: str, capacity: int, path: DataPath, *, pin: bool) -> None:
        super().__init__(name, capacity, path)
        if path.transfers is None:
            raise ValueError("the host tier copies on the cache's copy streams: DataPath.transfers is required")
        self.transfers: Transfers = path.transfers
        self.pool = HostPool(capacity, pin=pin, deferred=self.transfers.deferred)
        self._held: dict[EntryId, _Held] = {}
        self._reads_lock = threading.Lock()  # loads run outside the cache's lock, several at once

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> HostTier:
        pinned = isinstance(budget, HostBudget) and budget.pinned
        # Pinning serves DMA to the device only.
        return cls(name, budget.capacity, path, pin=pinned and path.device.type == "cuda")

    @property
    def mode(self) -> str:
        return "pinned" if self.pool.pinned else "pageable"

    def describe(self) -> TierState:
        pool = self.pool
        note = f"host pool: {format_size(pool.capacity)} " + (
            "pinned" if pool.pinned else f"pageable because {pool.why_pageable}"
        )
        if pool.fallbacks:
            note += f"; {pool.fallbacks} entries stored in pageable memory outside it (full)"
        return TierState(mode=self.mode, notes=(note,))

    # ---- offload ----------------------------------------------------------------------------------------------
    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors,
        *,
        source: str,
        copy: bool,
        after: Event | None,
        written_ns: int | None = None,
    ) -> None:
        """Offload: copy the tensors into the pool on the offload stream, after the work that produced them (the
        producers' current streams, and `after`: the copy that filled them, for tensors the cache promoted)."""
        self._admit(entry, spec)
        offsets, span = entry_layout(spec)
        home: Home | None = None
        stream: Stream | None = None
        producers = {t.device for t in tensors.values()}
        try:
            home = self._allocate(span)
            copies = []
            for tspec, offset in zip(spec.tensors, offsets, strict=True):
                flat = as_bytes(tensors[tspec.name])
                copies += [(dst, flat[at : at + dst.numel()]) for at, dst in self._range(home, offset, tspec.nbytes)]
            stream = self.transfers.offload_stream(producers)
            for device in producers:  # the copy reads what the producer's queued work writes
                stream.wait(consumer_stream(device).record())
            if after is not None:
                stream.wait(after)
            start = stream.record()
            self.transfers.copy(stream, copies)
            ready = stream.record()
        except BaseException:
            if home is not None:
                self._free(home, () if stream is None else (stream.record(),))
            self._forget(entry)
            raise
        self._held[entry] = _Held(spec, home, offsets, span, ready)
        if self.path.device.type == "cpu":  # a reload lands in host memory: have it warm for the first get
            self.transfers.host_buffers.prepare(span)
        # Sources stay allocated until copied: CUDA tensors through the allocator, others held until then.
        self.transfers.deferred.after(ready, _keep(*stream.uses(tensors.values())))
        self._log_when_done(source, self.name, spec.nbytes, start, ready)
        if source == "put":  # the caller's tensors: its later work (which may overwrite them) comes after the copy
            try:
                for device in producers:
                    consumer_stream(device).wait(ready)
            except BaseException:
                self.delete(entry)
                raise

    def _allocate(self, nbytes: int) -> Home:
        extents = self.pool.allocate(nbytes)
        if extents is None:  # the pool is full or split too finely: pageable memory, counted in pool.fallbacks
            return torch.empty(nbytes, dtype=torch.uint8)
        return extents

    def _range(self, home: Home, start: int, nbytes: int) -> list[tuple[int, torch.Tensor]]:
        """The bytes [start, start + nbytes) of an entry as (offset from start, a uint8 view of them) pieces."""
        if isinstance(home, torch.Tensor):
            return [(0, home[start : start + nbytes])] if nbytes else []
        region = self.pool.region
        return [(at, region[offset : offset + n]) for at, offset, n in pieces(home, nbytes, start)]

    # ---- reload -----------------------------------------------------------------------------------------------
    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        """Enqueue copies of the entry's tensors (or those named) to `device` on the reload stream, after the
        offload that filled them; the Load has landed at once (its event marks the copies). With device None: views
        of the pool where a tensor lies in one extent, copies where it spans several, after that offload."""
        held = self._held[entry]
        if device is None:
            return Load(self._views(held, names), held.ready)
        stream = self.transfers.reload_stream(device)
        out: Tensors = {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        if names is None:  # the whole entry: one buffer laid out as in the pool, filled by one run of copies
            raw = stream.empty(max(held.span, 1), device)
            copies = [(raw[at : at + src.numel()], src) for at, src in self._range(held.home, 0, held.span)]
            for tspec, offset in zip(held.spec.tensors, held.offsets, strict=True):
                out[tspec.name] = from_bytes(raw[offset:], tspec)
        else:
            for index in select(held.spec, names):
                tspec, offset = held.spec.tensors[index], held.offsets[index]
                raw = stream.empty(max(tspec.nbytes, 1), device)
                copies += [(raw[at : at + s.numel()], s) for at, s in self._range(held.home, offset, tspec.nbytes)]
                out[tspec.name] = from_bytes(raw, tspec)
        start = stream.record()  # before the wait: a failed offload's error reaches `done`, not `start`
        stream.wait(held.ready)
        self.transfers.copy(stream, copies)
        done = stream.record()
        with self._reads_lock:  # pruned in place: a concurrent load's event is never dropped
            held.reads[:] = [e for e in held.reads if not e.query()]
            held.reads.append(done)
        nbytes = sum(t.nbytes for t in out.values())
        self._log_when_done(self.name, self.path.endpoint(device), nbytes, start, done)
        return Load(out, done)

    def _views(self, held: _Held, names: Sequence[str] | None) -> Tensors:
        held.ready.synchronize()  # the views are read by the host thread (a demotion to nvme)
        out: Tensors = {}
        for index in select(held.spec, names):
            tspec, offset = held.spec.tensors[index], held.offsets[index]
            parts = [view for _, view in self._range(held.home, offset, tspec.nbytes)]
            if not parts:
                out[tspec.name] = torch.empty(tspec.shape, dtype=tspec.torch_dtype)
                continue
            out[tspec.name] = from_bytes(parts[0] if len(parts) == 1 else torch.cat(parts), tspec)
        return out

    # ---- removal ----------------------------------------------------------------------------------------------
    def delete(self, entry: EntryId) -> None:
        self._forget(entry)
        held = self._held.pop(entry)
        with self._reads_lock:
            busy = [held.ready, *held.reads]
        self._free(held.home, busy)

    def _free(self, home: Home, busy: Sequence[Event]) -> None:
        """Return an entry's extents to the pool (or drop its pageable buffer) once no copy uses them."""
        done = all_of(busy)
        if isinstance(home, torch.Tensor):
            self.transfers.deferred.after(done, _keep(home))
        else:
            self.pool.release_after(done, home)

    def close(self) -> None:
        for entry in list(self._held):
            self.delete(entry)
        self.pool.close()

    def _log_when_done(self, source: str, dest: str, nbytes: int, start: Event, end: Event) -> None:
        mode = self.mode
        self.transfers.deferred.after(end, lambda: self._log(source, dest, nbytes, end.seconds_since(start), mode))


def _keep(*objects: object) -> Callable[[], None]:
    """A release that holds `objects` alive until it runs, then lets them go."""
    held = list(objects)
    return held.clear
