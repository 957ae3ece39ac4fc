"""The pathway cost model: predicted time of a transfer = fixed latency + bytes / bandwidth.

Figures come from a hardware profile, a TOML file under `policies/profiles/` (or any path):

    name = "rtx-pro-6000-blackwell"
    source = "where the figures come from"
    measured = false                      # true when `tiercache calibrate` wrote it on the machine it describes
    [pathways."host(pinned)->hbm"]
    bandwidth = "63GB"                    # bytes per second, decimal or binary units
    latency_us = 0

Every pathway in PATHWAYS must be given; those of SHARED_PATHWAYS may be (their assumed figure otherwise). Bandwidths
are per second; "63GB" is 63e9 bytes/s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PolicyError
from ..pathway import Pathway
from ..units import parse_size
from .schema import Policy, looks_like_path, preset_file, preset_files, read_toml

# Every route a transfer can take, at the cost model's grain (Pathway.costed). "hbm" is the compute device; on a
# machine without CUDA it is RAM, and the host pathways are memcpy.
PATHWAYS: tuple[Pathway, ...] = (
    Pathway("host", "hbm", "pinned"),
    Pathway("hbm", "host", "pinned"),
    Pathway("host", "hbm", "pageable"),
    Pathway("hbm", "host", "pageable"),
    Pathway("nvme", "hbm"),
    Pathway("hbm", "nvme"),
    Pathway("nvme", "host"),
    Pathway("host", "nvme"),
)


@dataclass(frozen=True)
class PathwayCost:
    latency_s: float
    bandwidth: float  # bytes per second

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth


# Routes to and from the shared stores: a profile may give them (their servers are not the machine's to calibrate);
# where one does not, a figure on the slow side stands in: for a Mooncake Store over TCP on a data-centre network,
# and for an S3 server across one.
ASSUMED_REMOTE = PathwayCost(latency_s=0.001, bandwidth=2e9)
ASSUMED_OBJECT = PathwayCost(latency_s=0.02, bandwidth=0.5e9)
SHARED_PATHWAYS: dict[Pathway, PathwayCost] = {
    Pathway(a, b): cost
    for tier, cost in (("remote", ASSUMED_REMOTE), ("object", ASSUMED_OBJECT))
    for a, b in ((tier, "hbm"), ("hbm", tier), (tier, "host"), ("host", tier))
}


@dataclass(frozen=True)
class Profile:
    """The measured or assumed speed of every pathway of one machine."""

    name: str
    source: str
    measured: bool
    pathways: Mapping[Pathway, PathwayCost]
    description: str = ""
    path: str = "<built in>"

    def seconds(self, pathway: Pathway | str, nbytes: int) -> float:
        """Predicted seconds to move `nbytes` along `pathway` (costed at the profile's grain); KeyError for a
        pathway the cost model has no figure for (a put into hbm, a copy to another device)."""
        if isinstance(pathway, str):
            pathway = Pathway.parse(pathway)
        return self.pathways[pathway.costed()].seconds(nbytes)

    def covers(self, pathway: Pathway) -> bool:
        """Whether the cost model has a figure for `pathway`."""
        return pathway.costed() in self.pathways

    def describe(self) -> str:
        kind = "measured by tiercache calibrate" if self.measured else "preset figures, not measured on this machine"
        return f"profile {self.name!r} ({kind}; {self.source})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str) -> Profile:
        allowed = {"name", "description", "source", "measured", "pathways"}
        for key in data:
            if key not in allowed:
                raise PolicyError(f"{path}: unknown key '{key}'; allowed: {', '.join(sorted(allowed))}")
        table = data.get("pathways", {})
        names, optional = [str(p) for p in PATHWAYS], [str(p) for p in SHARED_PATHWAYS]
        missing = [n for n in names if n not in table]
        unknown = [n for n in table if n not in names and n not in optional]
        if missing or unknown:
            raise PolicyError(
                f"{path}: [pathways] must give exactly {', '.join(names)} (and may give "
                f"{', '.join(optional)}); missing {missing or 'none'}, unknown {unknown or 'none'}"
            )
        costs: dict[Pathway, PathwayCost] = dict(SHARED_PATHWAYS)
        for name in (*PATHWAYS, *(p for p in SHARED_PATHWAYS if str(p) in table)):
            entry = table[str(name)]
            where = f'{path}: pathways."{name}"'
            if not isinstance(entry, Mapping) or set(entry) - {"bandwidth", "latency_us"} or "bandwidth" not in entry:
                raise PolicyError(f"{where}: expected a table with bandwidth (e.g. '14GB') and latency_us")
            try:
                bandwidth = parse_size(entry["bandwidth"])
            except ValueError as exc:
                raise PolicyError(f"{where}.bandwidth: {exc} (bytes per second)") from None
            latency = entry.get("latency_us", 0)
            if bandwidth <= 0 or isinstance(latency, bool) or not isinstance(latency, int | float) or latency < 0:
                raise PolicyError(f"{where}: bandwidth must be > 0 and latency_us a number >= 0")
            costs[name] = PathwayCost(latency_s=float(latency) / 1e6, bandwidth=float(bandwidth))
        measured = data.get("measured", False)
        if not isinstance(measured, bool):
            raise PolicyError(f"{path}: measured must be true or false")
        return cls(
            name=str(data.get("name", Path(path).stem)),
            source=str(data.get("source", "unstated")),
            measured=measured,
            pathways=costs,
            description=str(data.get("description", "")),
            path=path,
        )

    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """A profile by path, or by name from `policies/profiles/NAME.toml`."""
        path = _find(name_or_path)
        return cls.from_dict(read_toml(path, "profile"), str(path))

    def to_toml(self) -> str:
        lines = [
            f"name = {_q(self.name)}",
            f"description = {_q(self.description)}",
            f"source = {_q(self.source)}",
            f"measured = {'true' if self.measured else 'false'}",
        ]
        for name in PATHWAYS:  # the object routes are the user's to add: calibrate measures the machine alone
            cost = self.pathways[name]
            lines += ["", f'[pathways."{name}"]', f'bandwidth = "{cost.bandwidth / 1e9:.3f}GB"']
            lines.append(f"latency_us = {cost.latency_s * 1e6:.1f}")
        return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def profile_for(policy: Policy) -> Profile:
    """The profile a policy names; a relative path is looked up beside the policy file first."""
    ref = policy.profile
    source = Path(policy.source)
    if looks_like_path(ref) and not Path(ref).is_absolute() and source.is_file():
        beside = source.parent / ref
        if beside.is_file():
            return Profile.load(beside)
    try:
        return Profile.load(ref)
    except PolicyError as exc:
        raise PolicyError(f"{policy.source}: profile: {exc}") from None


def profile_names() -> list[str]:
    return sorted(preset_files("profiles"))


def _find(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if looks_like_path(str(name_or_path)):
        if candidate.is_file():
            return candidate
        raise PolicyError(f"{candidate}: no such profile file")
    path = preset_file(str(name_or_path), "profiles")
    if path is not None:
        return path
    raise PolicyError(f"no hardware profile named {str(name_or_path)!r}; profiles are {', '.join(profile_names())}")


def fit_line(points: Iterable[tuple[int, float]]) -> PathwayCost:
    """Least-squares latency + bytes / bandwidth through (bytes, seconds) points; latency clamped at 0."""
    pts = list(points)
    if len(pts) < 2 or len({n for n, _ in pts}) < 2:
        raise ValueError("fitting latency and bandwidth needs measurements at two sizes or more")
    n = len(pts)
    mean_x = sum(x for x, _ in pts) / n
    mean_y = sum(y for _, y in pts) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in pts)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pts) / sxx  # seconds per byte
    intercept = mean_y - slope * mean_x
    if slope <= 0:  # noise swamped the size dependence: take the best observed throughput, no latency
        return PathwayCost(0.0, max(x / y for x, y in pts))
    if intercept < 0:  # refit through the origin
        slope = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
        intercept = 0.0
    return PathwayCost(intercept, 1.0 / slope)
