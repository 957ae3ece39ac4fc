"""What the cache did: per-tier occupancy and hits, and every transfer by pathway (bytes, seconds, GB/s)."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from .pathway import Pathway


@dataclass(frozen=True)
class PathwayStats:
    """All transfers along one route, e.g. 'nvme(o_direct)->hbm' or 'hbm->host(pinned)'."""

    name: str  # str(pathway)
    pathway: Pathway
    transfers: int
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        """Decimal GB per second over the recorded transfers."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TierStats:
    name: str
    capacity: int
    used: int
    entries: int
    pinned: int
    hits: int
    mode: str | None = None  # how it moves bytes to and from host memory: "pinned", "pageable", "o_direct", ...


@dataclass(frozen=True)
class CacheStats:
    policy: str
    device: str
    nvme_io: str  # "o_direct" or "buffered": how the nvme tier's files are read and written from host memory
    nvme_device_io: str  # "gds" or "compat" (kvikio, straight to the GPU), or "none" (everything via host memory)
    tiers: dict[str, TierStats]
    pathways: dict[str, PathwayStats]
    misses: int
    evicted: int  # entries that left the cache because no lower tier could take them
    expired: int  # entries removed by eviction.ttl_s
    profile: str  # the cost model's hardware profile
    profile_measured: bool  # False: the preset's assumed figures, not measured on this machine
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, p in self.pathways.items():
            out["pathways"][name].update(pathway=name, gbps=p.gbps)
        return out


class TransferLog:
    """Thread-safe running totals per pathway."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[Pathway, tuple[int, int, float]] = {}

    def record(self, pathway: Pathway, nbytes: int, seconds: float) -> None:
        with self._lock:
            count, total, secs = self._totals.get(pathway, (0, 0, 0.0))
            self._totals[pathway] = (count + 1, total + nbytes, secs + seconds)

    def snapshot(self) -> dict[str, PathwayStats]:
        with self._lock:
            totals = sorted(self._totals.items(), key=lambda item: str(item[0]))
            return {str(p): PathwayStats(str(p), p, c, b, s) for p, (c, b, s) in totals}
