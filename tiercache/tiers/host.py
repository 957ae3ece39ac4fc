"""The host tier: entries' bytes in the host pool (pinned where CUDA works), moved by the copy streams.

Offloads (`put`) copy device->host on the offload stream after the producer's work; reloads (`load`) copy
host->device on the reload stream after the offload that filled the extents. Extents go back to the pool only once
every copy that touches them is done, so a buffer is never reused while a copy from or into it is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..entry import EntrySpec, Tensors, TensorSpec, as_bytes, from_bytes
from ..pinned import Extent, HostPool, pieces
from ..transfer import Event, Stream, Transfers, all_of, consumer_stream
from .base import EntryId, Tier

OnCopy = Callable[[str, int, float], None]  # (pathway, bytes, seconds), called when a copy has completed

Home = list[Extent] | torch.Tensor  # a tensor's bytes: extents of the pool, or pageable memory when the pool is full


@dataclass
class _Held:
    spec: EntrySpec
    homes: list[Home]
    ready: Event  # the offload that filled it
    reads: list[Event] = field(default_factory=list)  # reloads from it that may still be in flight


class HostTier(Tier):
    keeps_tensors = False
    logs_transfers = True

    def __init__(self, capacity: int, *, pin: bool, transfers: Transfers, on_copy: OnCopy) -> None:
        super().__init__("host", capacity)
        self.transfers = transfers
        self.pool = HostPool(capacity, pin=pin, deferred=transfers.deferred)
        self._on_copy = on_copy
        self._held: dict[EntryId, _Held] = {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def label(self) -> str:
        return f"host({'pinned' if self.pool.pinned else 'pageable'})"

    # ---- offload ----------------------------------------------------------------------------------------------
    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors | None,
        source: str | None = None,
        after: Event | None = None,
    ) -> None:
        """Offload: copy the tensors into the pool on the offload stream, after the work that produced them (the
        producers' current streams, and `after`: the copy that filled them, for tensors the cache promoted)."""
        if tensors is None:
            raise ValueError(f"tier host stores tensors; got none for {spec.key!r}")
        self._admit(entry, spec)
        homes: list[Home] = []
        stream: Stream | None = None
        producers = {t.device for t in tensors.values()}
        try:
            copies = []
            for tspec in spec.tensors:
                flat = as_bytes(tensors[tspec.name])
                home, dsts = self._home(tspec)
                homes.append(home)
                copies += [(dst, flat[at : at + dst.numel()]) for at, dst in dsts]
            stream = self.transfers.offload_stream(producers)
            for device in producers:  # the copy reads what the producer's queued work writes
                stream.wait(consumer_stream(device).record())
            if after is not None:
                stream.wait(after)
            start = stream.record()
            self.transfers.copy(stream, copies)
            ready = stream.record()
        except BaseException:
            self._free(homes, () if stream is None else (stream.record(),))
            self._forget(entry)
            raise
        self._held[entry] = _Held(spec, homes, ready)
        # Sources stay allocated until copied: CUDA tensors through the allocator, others held until then.
        self.transfers.deferred.after(ready, _keep(*stream.uses(tensors.values())))
        self._log_when_done(f"{source or 'hbm'}->{self.label}", spec.nbytes, start, ready)
        if source == "put":  # the caller's tensors: its later work (which may overwrite them) comes after the copy
            try:
                for device in producers:
                    consumer_stream(device).wait(ready)
            except BaseException:
                self.delete(entry)
                raise

    def _home(self, tspec: TensorSpec) -> tuple[Home, list[tuple[int, torch.Tensor]]]:
        """Where a tensor's bytes go, and the (byte offset in the tensor, destination) pieces to copy."""
        extents = self.pool.allocate(tspec.nbytes)
        if extents is None:  # the pool is full or split too finely: pageable memory, counted in pool.fallbacks
            buffer = torch.empty(tspec.nbytes, dtype=torch.uint8)
            return buffer, [(0, buffer)]
        return extents, [(at, self.pool.region[offset : offset + n]) for at, offset, n in pieces(extents, tspec.nbytes)]

    # ---- reload -----------------------------------------------------------------------------------------------
    def load(
        self, entry: EntryId, device: torch.device, names: Sequence[str] | None = None, *, dest: str = "hbm"
    ) -> tuple[Tensors, Event]:
        """Start copying the entry's tensors (or those named) to `device`; returns them and the event after which
        they hold their values. Consumers wait on the event before use (`Stream.wait`, or `event.synchronize()`).
        `dest` names the destination in the pathway logged."""
        held = self._held[entry]
        held.reads = [e for e in held.reads if not e.query()]
        stream = self.transfers.reload_stream(device)
        wanted = set(names) if names is not None else None
        out: Tensors = {}
        copies = []
        nbytes = 0
        for tspec, home in zip(held.spec.tensors, held.homes, strict=True):
            if wanted is not None and tspec.name not in wanted:
                continue
            raw = stream.empty(max(tspec.nbytes, 1), device)[: tspec.nbytes]
            copies += [(raw[at : at + src.numel()], src) for at, src in self._sources(tspec, home)]
            out[tspec.name] = from_bytes(raw, tspec)
            nbytes += tspec.nbytes
        start = stream.record()  # before the wait: a failed offload's error reaches `done`, not `start`
        stream.wait(held.ready)
        self.transfers.copy(stream, copies)
        done = stream.record()
        held.reads.append(done)
        self._log_when_done(f"{self.label}->{dest}", nbytes, start, done)
        return out, done

    def _sources(self, tspec: TensorSpec, home: Home) -> list[tuple[int, torch.Tensor]]:
        if isinstance(home, torch.Tensor):
            return [(0, home)]
        return [(at, self.pool.region[offset : offset + n]) for at, offset, n in pieces(home, tspec.nbytes)]

    def read(self, entry: EntryId) -> Tensors:
        """The entry's tensors in host memory, for the host thread (a demotion to nvme): views of the pool where a
        tensor lies in one extent, copies where it spans several. Waits for the offload that filled them."""
        held = self._held[entry]
        held.ready.synchronize()
        out: Tensors = {}
        for tspec, home in zip(held.spec.tensors, held.homes, strict=True):
            sources = self._sources(tspec, home)
            raw = sources[0][1] if len(sources) == 1 else torch.cat([src for _, src in sources])
            out[tspec.name] = (
                from_bytes(raw, tspec) if tspec.nbytes else torch.empty(tspec.shape, dtype=tspec.torch_dtype)
            )
        return out

    # ---- removal ----------------------------------------------------------------------------------------------
    def delete(self, entry: EntryId) -> None:
        self._forget(entry)
        held = self._held.pop(entry)
        self._free(held.homes, [held.ready, *held.reads])

    def _free(self, homes: list[Home], busy: Sequence[Event]) -> None:
        """Return a tensor's extents to the pool (or drop its pageable buffer) once no copy uses them."""
        extents = [e for home in homes if not isinstance(home, torch.Tensor) for e in home]
        buffers = [home for home in homes if isinstance(home, torch.Tensor)]
        done = all_of(busy)
        self.pool.release_after(done, extents)
        self.transfers.deferred.after(done, _keep(buffers))

    def close(self) -> None:
        for entry in list(self._held):
            self.delete(entry)
        self.pool.close()

    def _log_when_done(self, pathway: str, nbytes: int, start: Event, end: Event) -> None:
        self.transfers.deferred.after(end, lambda: self._on_copy(pathway, nbytes, end.seconds_since(start)))


def _keep(*objects: object) -> Callable[[], None]:
    """A release that holds `objects` alive until it runs, then lets them go."""
    held = list(objects)
    return held.clear
