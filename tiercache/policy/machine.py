"""What the machine has, and policies that fit it: `policy="auto"` and the checks of an explicit policy.

`Machine.detect` measures the compute device, the RAM this process could still get and the disk under the root;
`auto_policy` picks the preset for the device and scales its budgets to those figures; `check_fits` refuses an
explicit policy that asks for more than the machine has. Both take a `Machine`, so a test hands them a fake one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PolicyError
from ..units import format_size
from .schema import Policy, looks_like_path, preset_files

MiB = 1 << 20

# The shares of what is free that auto budgets take. A cache is one part of a pipeline: the rest is left to it.
HBM_SHARE = 0.5  # of free device memory: the models' activations and the CUDA allocator's slack need the rest
# Of the RAM available, with CUDA. The host pool is pinned (never swapped) and the pool refuses to pin more than
# half of the RAM available at open: 40% stays pinnable even if the process allocates more before it opens.
HOST_SHARE = 0.4
# Of the RAM available, without CUDA, for hbm and host together: both tiers are then RAM, beside the pipeline's
# own tensors, and nothing is pinned, so half of it.
RAM_SHARE_CPU = 0.5
# Of the free disk (statvfs f_bavail, which already leaves out the filesystem's reserve): other writers, logs and
# the filesystem's slowdown near full keep the rest. Bytes already stored in the root count as the cache's own.
NVME_SHARE = 0.8
# Below these a tier holds too little to be worth having; a floor never exceeds the figure it is taken from.
FLOORS: dict[str, int] = {"hbm": 256 * MiB, "host": 256 * MiB, "nvme": 1024 * MiB}

# Presets named for a device, matched in its upper-cased name; whole words, so that a GH200 (another memory and
# another host link) is not taken for an H200 and falls to the closest-below rule instead.
NAMED: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("h200", re.compile(r"\bH200\b")),
    ("h100", re.compile(r"\bH100\b")),
    ("rtx-pro-6000-blackwell", re.compile(r"(?=.*\bRTX PRO 6000\b)(?=.*\bBLACKWELL\b)")),
)
NO_CUDA_PRESET = "cpu"
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class Machine:
    """The figures a policy is fitted to and checked against; None where a figure is unknown (its check skipped)."""

    device_kind: str  # "cpu" (no CUDA device: hbm is RAM), or the CUDA device's name as torch reports it
    device_free: int | None = None  # bytes free on the CUDA device now; None on CPU
    ram_available: int | None = None  # bytes this process could still get (MemAvailable, capped by a cgroup)
    disk_free: int | None = None  # bytes free to an unprivileged writer on the filesystem holding the root
    device_total: int | None = None  # the CUDA device's memory: what an explicit hbm budget is checked against
    disk_path: str | None = None  # where disk_free was measured: the root or its nearest existing parent
    disk_size: int | None = None  # the whole filesystem's size: what an explicit nvme budget is checked against

    @property
    def cuda(self) -> bool:
        return self.device_kind != "cpu"

    @classmethod
    def detect(cls, device: torch.device, root: Path | None) -> Machine:
        """Measure the machine for a cache computing on `device` and storing under `root` (None: no disk figure)."""
        kind, free, total = "cpu", None, None
        if device.type == "cuda" and torch.cuda.is_available():
            index = torch.cuda.current_device() if device.index is None else device.index
            kind = f"cuda:{index}"  # still a CUDA device if its name cannot be read
            try:
                kind = torch.cuda.get_device_name(index)
                free, total = torch.cuda.mem_get_info(index)
            except (RuntimeError, AssertionError, ValueError):  # a device CUDA cannot query now: figures unknown
                pass
        disk_path, disk_free, disk_size = _disk(root) if root is not None else (None, None, None)
        return cls(kind, free, available_ram(), disk_free, total, disk_path, disk_size)


def available_ram() -> int | None:
    """Bytes this process could still get: MemAvailable of /proc/meminfo, or less where a memory cgroup (a
    container, a systemd slice) caps it; None where neither can be read."""
    figures = _cgroup_room()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return min(figures) if figures else None


def _cgroup_room() -> list[int]:
    """Limit less usage of the memory cgroups that hold this process (v2 and v1, its own and the mount's root,
    which is its own inside a container); empty where none sets a limit. Usage counts reclaimable page cache, so
    this errs low, which is the safe side for a budget."""
    base = Path("/sys/fs/cgroup")
    own: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    places = [base / own.get("", ""), base]  # v2: one hierarchy, "0::/path"
    files = [("memory.max", "memory.current")] * 2
    places += [base / "memory" / own.get("memory", ""), base / "memory"]  # v1: the memory controller's own
    files += [("memory.limit_in_bytes", "memory.usage_in_bytes")] * 2
    rooms: list[int] = []
    for place, (limit_file, usage_file) in zip(places, files, strict=True):
        try:
            limit = (place / limit_file).read_text().strip()
            if limit != "max" and int(limit) < _UNLIMITED:
                rooms.append(max(0, int(limit) - int((place / usage_file).read_text())))
        except (OSError, ValueError):
            continue
    return rooms


def _disk(root: Path) -> tuple[str, int | None, int | None]:
    """Where the disk was measured, its free bytes and its size: the root may not exist yet, so its nearest
    existing parent (the filesystem it will be created on)."""
    where = Path(os.path.abspath(root))
    while not os.path.exists(where) and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return str(where), None, None
    return str(where), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def pick_preset(machine: Machine) -> tuple[str, str]:
    """The preset for the machine's device, and why, in words: "cpu" without CUDA; a preset named for the device;
    else the GPU preset whose hbm budget is the closest below the device's memory."""
    if not machine.cuda:
        return NO_CUDA_PRESET, "for no CUDA device"
    presets = preset_files()
    upper = machine.device_kind.upper()
    for name, pattern in NAMED:
        if name in presets and pattern.search(upper):
            return name, f"for {machine.device_kind}"
    budgets = {name: Policy.load(path).tiers.hbm.capacity for name, path in presets.items() if name != NO_CUDA_PRESET}
    if not budgets:
        return NO_CUDA_PRESET, f"for {machine.device_kind}: no GPU preset was found"
    unnamed = f"for {machine.device_kind}, which no preset is named for"
    memory = machine.device_total if machine.device_total is not None else machine.device_free
    smallest = min(budgets, key=lambda name: (budgets[name], name))
    if memory is None:
        return smallest, (
            f"{unnamed}; its memory is not known, so the GPU preset with the smallest hbm budget "
            f"({format_size(budgets[smallest])})"
        )
    fitting = [name for name in budgets if budgets[name] <= memory]
    if not fitting:
        return smallest, (
            f"{unnamed}; no GPU preset's hbm budget fits in its {format_size(memory)}, so the smallest "
            f"({format_size(budgets[smallest])})"
        )
    best = max(fitting, key=lambda name: (budgets[name], name))
    return best, (
        f"{unnamed}: its hbm budget ({format_size(budgets[best])}) is the GPU presets' closest below the "
        f"device's {format_size(memory)}"
    )


def _mib(nbytes: int) -> int:
    """Rounded down to whole MiB, for budgets that read well; a figure below 1 MiB is kept as it is."""
    return nbytes - nbytes % MiB if nbytes >= MiB else nbytes


def _fit(preset: int, share: float, figure: int | None, floor: int, what: str, held: int = 0) -> tuple[int, str]:
    """A tier's budget: `share` of `figure` (plus `held`, bytes the tier holds already), never above the preset's
    nor below the floor where the figure allows one; and, in words, how it was reached."""
    if preset == 0:
        return 0, "0 (off in the preset)"
    if figure is None:
        return preset, f"{format_size(preset)} (preset; {what} not known)"
    room = int(share * figure) + held
    plus = f", plus {format_size(held)} already stored" if held else ""
    if room >= preset:
        return preset, f"{format_size(preset)} (preset; within {share:.0%} of {format_size(figure)} {what}{plus})"
    floor = min(floor, figure + held, preset)
    if room < floor:
        return floor, f"{format_size(floor)} (the floor; {share:.0%} of {format_size(figure)} {what} is less)"
    value = _mib(room)
    scaled = f"{share:.0%} of {format_size(figure)} {what}{plus}"
    return value, f"{format_size(value)} ({scaled}; preset {format_size(preset)})"


def _fit_ram(hbm: int, host: int, ram: int | None) -> tuple[int, int, str]:
    """Without CUDA, hbm and host are both RAM: they share one budget, split as in the preset."""
    sizes = f"hbm {format_size(hbm)}, host {format_size(host)}"
    if ram is None:
        return hbm, host, f"{sizes} (preset; RAM available not known)"
    room = int(RAM_SHARE_CPU * ram)
    of_ram = f"{RAM_SHARE_CPU:.0%} of {format_size(ram)} RAM available"
    if hbm + host <= room:
        return hbm, host, f"{sizes} (preset; together within {of_ram})"
    floor = min(FLOORS["hbm"] + FLOORS["host"], ram, hbm + host)
    budget = max(room, floor)
    scaled_hbm = _mib(budget * hbm // (hbm + host))
    scaled_host = _mib(budget - scaled_hbm)
    how = f"the floor, as {of_ram} is less" if room < floor else of_ram
    return (
        scaled_hbm,
        scaled_host,
        (
            f"hbm {format_size(scaled_hbm)}, host {format_size(scaled_host)} (together {how}, both being RAM without "
            f"CUDA; split as the preset's {format_size(hbm)} + {format_size(host)})"
        ),
    )


def auto_policy(machine: Machine, stored_bytes: int = 0) -> Policy:
    """The preset for `machine`'s device with its budgets scaled to the machine; `chosen` says what and why, and
    `source` is "auto". `stored_bytes`: what the root holds already, counted as nvme room the cache has."""
    name, why = pick_preset(machine)
    preset = Policy.preset(name)
    tiers = preset.tiers
    if machine.cuda:
        device, memory_is = machine.device_free, "free device memory"
        if device is None and machine.device_total is not None:  # still never more than the device holds
            device, memory_is = machine.device_total, "device memory (free not known)"
        hbm, hbm_how = _fit(tiers.hbm.capacity, HBM_SHARE, device, FLOORS["hbm"], memory_is)
        host, host_how = _fit(tiers.host.capacity, HOST_SHARE, machine.ram_available, FLOORS["host"], "RAM available")
        memory = f"hbm {hbm_how}, host {host_how}"
    else:
        hbm, host, memory = _fit_ram(tiers.hbm.capacity, tiers.host.capacity, machine.ram_available)
    under = f"free under {machine.disk_path}" if machine.disk_path else "free disk"
    nvme, nvme_how = _fit(tiers.nvme.capacity, NVME_SHARE, machine.disk_free, FLOORS["nvme"], under, stored_bytes)
    fitted = dataclasses.replace(
        tiers,
        hbm=dataclasses.replace(tiers.hbm, capacity=hbm),
        host=dataclasses.replace(tiers.host, capacity=host),
        nvme=dataclasses.replace(tiers.nvme, capacity=nvme),
    )
    profile = preset.profile
    beside = Path(preset.source).parent / profile
    if looks_like_path(profile) and beside.is_file():  # the source becomes "auto": anchor a relative profile now
        profile = str(beside)
    chosen = f"auto: preset {name!r} {why}; {memory}, nvme {nvme_how}"
    return dataclasses.replace(preset, tiers=fitted, profile=profile, source="auto", chosen=chosen)


FIX = 'in the policy, or use policy="auto" to size the tiers to this machine'


def _more(value: int, figure: int) -> str:
    """ "V is more than the F", in bytes too where the short forms would read alike (8 GiB against 7.99 GiB)."""
    said, limit = format_size(value), format_size(figure)
    if said == limit:
        said, limit = f"{said} ({value} bytes)", f"{limit} ({figure} bytes)"
    return f"{said} is more than the {limit}"


def check_fits(policy: Policy, machine: Machine, stored_bytes: int = 0) -> None:
    """Raise PolicyError, naming each key, its value, the figure available and the fix, where a budget exceeds what
    `machine` has. hbm against the device's memory (without CUDA, hbm + host against the RAM available); host
    against the RAM available; nvme against the free disk plus `stored_bytes` already in the root. A figure the
    machine does not know (None) is not checked."""
    tiers, size = policy.tiers, format_size
    found: list[str] = []
    if machine.cuda:
        if machine.device_total is not None and tiers.hbm.capacity > machine.device_total:
            found.append(
                f"tiers.hbm.capacity = {_more(tiers.hbm.capacity, machine.device_total)} of memory of "
                f"{machine.device_kind}"
            )
        if machine.ram_available is not None and tiers.host.capacity > machine.ram_available:
            found.append(f"tiers.host.capacity = {_more(tiers.host.capacity, machine.ram_available)} of RAM available")
    elif machine.ram_available is not None and tiers.hbm.capacity + tiers.host.capacity > machine.ram_available:
        found.append(
            f"tiers.hbm.capacity + tiers.host.capacity = {size(tiers.hbm.capacity)} + {size(tiers.host.capacity)} "
            f"= {_more(tiers.hbm.capacity + tiers.host.capacity, machine.ram_available)} of RAM available (without "
            "CUDA both tiers are RAM)"
        )
    # nvme against the filesystem's size: a budget it can never hold. One above today's free space is only a
    # warning when the root opens (the nvme tier's), since disks are freed and a budget is filled over time.
    if machine.disk_size and tiers.nvme.capacity > machine.disk_size:  # 0: a pseudo filesystem (/proc), no figure
        where = f" under {machine.disk_path}" if machine.disk_path else ""
        found.append(f"tiers.nvme.capacity = {_more(tiers.nvme.capacity, machine.disk_size)} of the filesystem{where}")
    if found:
        raise PolicyError(f"{policy.source}: {'; '.join(found)}: lower {'it' if len(found) == 1 else 'them'} {FIX}")
