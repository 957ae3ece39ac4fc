"""A stand-in for kvikio 26.x on machines without CUDA: the calls tiercache makes, with the same signatures and
return types (CuFile(path, flags) as a context manager, pread/pwrite(buf, size, file_offset) -> IOFuture with
.get() -> bytes moved, defaults.set({...}) / get / is_compat_mode_preferred, cufile_driver.get, SummaryMonitor),
doing POSIX I/O on host buffers. It lets the kvikio backend's logic run in `make test`; the real thing runs in
`make test-gpu`."""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import numpy as np
import pytest

SETTINGS: dict[str, Any] = {"num_threads": 1, "task_size": 4 << 20, "compat_mode": 2}
MOVED = {"POSIX": 0}


class IOFuture:
    def __init__(self, count: int) -> None:
        self._count = count

    def get(self) -> int:
        return self._count

    def done(self) -> bool:
        return True


class CuFile:
    def __init__(self, path: str, flags: str = "r") -> None:
        assert isinstance(path, str)
        modes = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}
        self._fd = os.open(path, modes[flags[0]] | os.O_CLOEXEC, 0o644)

    def __enter__(self) -> CuFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def pread(self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None) -> IOFuture:
        view = _host_view(buf)
        size = view.nbytes if size is None else size
        if size > view.nbytes:
            raise ValueError("Size is greater than the size of the buffer")
        data = os.pread(self._fd, size, file_offset)
        if len(data) < size:
            raise RuntimeError("POSIX error on pread: EOF")
        view[:size] = np.frombuffer(data, dtype=np.uint8)
        MOVED["POSIX"] += size
        return IOFuture(size)

    def pwrite(self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None) -> IOFuture:
        view = _host_view(buf)
        size = view.nbytes if size is None else size
        count = os.pwrite(self._fd, view[:size].tobytes(), file_offset)
        MOVED["POSIX"] += count
        return IOFuture(count)


def _host_view(buf: Any) -> np.ndarray:
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"this fake kvikio takes host numpy buffers, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError("Array must be contiguous")
    return buf.reshape(-1).view(np.uint8)


class _Summary:
    @property
    def by_backend(self) -> dict[str, dict[str, int]]:
        return {name: {"bytes_transferred": count} for name, count in MOVED.items()}


class SummaryMonitor:
    def get(self) -> _Summary:
        return _Summary()


def _set(settings: dict[str, Any] | str, value: Any = None) -> None:
    items = settings if isinstance(settings, dict) else {settings: value}
    for key, val in items.items():
        if key not in SETTINGS:
            raise KeyError(key)
        SETTINGS[key] = val


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import kvikio` (and kvikio.defaults, kvikio.cufile_driver) give this fake for one test."""
    kvikio = types.ModuleType("kvikio")
    defaults = types.ModuleType("kvikio.defaults")
    driver = types.ModuleType("kvikio.cufile_driver")
    defaults.set = _set  # type: ignore[attr-defined]
    defaults.get = SETTINGS.__getitem__  # type: ignore[attr-defined]
    defaults.is_compat_mode_preferred = lambda: True  # type: ignore[attr-defined]
    driver.get = {"is_gds_available": False}.__getitem__  # type: ignore[attr-defined]
    kvikio.CuFile = CuFile  # type: ignore[attr-defined]
    kvikio.SummaryMonitor = SummaryMonitor  # type: ignore[attr-defined]
    kvikio.defaults = defaults  # type: ignore[attr-defined]
    kvikio.cufile_driver = driver  # type: ignore[attr-defined]
    for name, module in (("kvikio", kvikio), ("kvikio.defaults", defaults), ("kvikio.cufile_driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
