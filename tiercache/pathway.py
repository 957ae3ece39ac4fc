"""Pathway: the route one transfer takes, as one value for stats, the cost model, the simulator, calibrate and bench.

    Pathway("host", "hbm", "pinned")      host(pinned)->hbm      a reload from the pinned host pool
    Pathway("nvme", "hbm", "o_direct")    nvme(o_direct)->hbm    a read of the nvme tier's files into the device
    Pathway("hbm", "nvme", "gds")         hbm->nvme(gds)         a write straight from GPU memory through cuFile
    Pathway("put", "host", "pageable")    put->host(pageable)    a put's tensors copied into the host tier

The mode says how the end that is not the compute device moves its bytes: "pinned" / "pageable" for the host pool,
"o_direct" / "buffered" for POSIX file I/O, "gds" / "compat" for kvikio. Between host and nvme it is nvme's mode.
No other code builds a pathway's name: `str(pathway)` is the one spelling, `Pathway.parse` reads it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOST_MODES = ("pinned", "pageable")
NVME_MODES = ("o_direct", "buffered", "gds", "compat")
MODES: dict[str, tuple[str, ...]] = {"host": HOST_MODES, "nvme": NVME_MODES}
# "put": the caller's tensors, wherever they are; any other end is a tier, or a device outside the cache ("cuda:1").
SOURCES = ("put", "hbm", "host", "remote", "nvme", "object")

_TEXT = re.compile(r"^(?P<src>[\w:]+)(?:\((?P<smode>\w+)\))?->(?P<dst>[\w:]+)(?:\((?P<dmode>\w+)\))?$")


@dataclass(frozen=True, order=True)
class Pathway:
    source: str
    dest: str
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None:
            end = self.mode_end
            if end is None or self.mode not in MODES[end]:
                raise ValueError(f"pathway {self.source}->{self.dest}: mode {self.mode!r} is not a mode of either end")

    @property
    def mode_end(self) -> str | None:
        """Which end the mode describes: nvme where it is one of the ends, else host; None for hbm<->device."""
        if "nvme" in (self.source, self.dest):
            return "nvme"
        return "host" if "host" in (self.source, self.dest) else None

    def __str__(self) -> str:
        # The mode is written once, at its end: the source where both ends are that tier (a host reload to CPU).
        source, dest = self.source, self.dest
        if self.mode is not None and source == self.mode_end:
            source = f"{source}({self.mode})"
        elif self.mode is not None:
            dest = f"{dest}({self.mode})"
        return f"{source}->{dest}"

    @classmethod
    def parse(cls, text: str) -> Pathway:
        """The pathway `str()` spells as `text`, e.g. "host(pinned)->hbm"."""
        match = _TEXT.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a pathway such as 'host(pinned)->hbm' or 'nvme->hbm'")
        modes = [m for m in (match["smode"], match["dmode"]) if m]
        if len(modes) > 1:
            raise ValueError(f"{text!r}: a pathway has one mode, at its host or nvme end")
        pathway = cls(match["src"], match["dst"], modes[0] if modes else None)
        if str(pathway) != text.strip():
            raise ValueError(f"{text!r}: the mode belongs to the {pathway.mode_end} end ({pathway})")
        return pathway

    @property
    def family(self) -> str:
        """'nvme', 'remote' or 'object' for transfers to or from those tiers, else 'memory' (host pool and device
        memory)."""
        for shared in ("remote", "object"):
            if shared in (self.source, self.dest):
                return shared
        return "nvme" if self.mode_end == "nvme" else "memory"

    def costed(self) -> Pathway:
        """The pathway at the cost model's grain: a put moves from the compute device, nvme's mode is not told
        apart (one drive, whatever the API), the host pool's pinned or pageable is."""
        source = "hbm" if self.source == "put" else self.source
        mode = self.mode if self.mode_end == "host" and "hbm" in (source, self.dest) else None
        return Pathway(source, self.dest, mode)
