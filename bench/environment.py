"""The environment header of a report: what machine, what filesystem, which I/O mode, which versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy
import torch
import zarr

import tiercache
from tiercache.io.posix import probe_direct_io


def filesystem_of(path: Path) -> str:
    """The mount point and filesystem type holding `path`, from /proc/mounts."""
    best = ("?", "?")
    try:
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if resolved.startswith(mount) and len(mount) >= len(best[0]) and best[0] != mount:
                best = (mount, fstype)
    except OSError:
        pass
    return f"{best[1]} at {best[0]}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi failed)"


def kvikio_state() -> str:
    """kvikio's version and whether GDS or its compat mode will run, or why it is not used."""
    if not torch.cuda.is_available():
        return "not used (no CUDA)"
    try:
        import kvikio  # noqa: PLC0415
        import kvikio.cufile_driver  # noqa: PLC0415
        import kvikio.defaults  # noqa: PLC0415
    except ImportError as exc:
        return f"not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - kvikio 26 loads libcufile at import: a missing one raises RuntimeError
        return f"installed but does not load ({type(exc).__name__}: {exc})"
    try:
        gds = kvikio.cufile_driver.get("is_gds_available")
    except (RuntimeError, KeyError):
        gds = False
    # The cache's rule (tiercache/io/device_io.py): without the GDS driver, cuFile runs in its own compat mode even
    # where kvikio does not prefer compat.
    mode = "gds" if gds and not kvikio.defaults.is_compat_mode_preferred() else "compat"
    return f"{kvikio.__version__}, mode {mode}, GDS driver {'available' if gds else 'unavailable'}"


def stolen_cpu_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests since boot (the steal column of /proc/stat), all CPUs summed;
    None where there is no such counter. A run that lost much of it has slow phases that no repetition evens out,
    worst for the pathways that use the most CPU time (checksummed reads)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def describe(root: Path) -> dict[str, Any]:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    why_not_direct = probe_direct_io(root)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "gpu": gpu,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "driver": nvidia_driver(),
        "kvikio": kvikio_state(),
        "filesystem": filesystem_of(root),
        "o_direct": "yes" if why_not_direct is None else f"no ({why_not_direct})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "tiercache": tiercache.__version__,
    }
