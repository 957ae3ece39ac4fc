"""A stand-in for kvikio 26.x on machines without CUDA: the calls tiercache makes, with the same signatures and
return types (CuFile(path, flags) as a context manager, pread/pwrite(buf, size, file_offset, task_size) -> IOFuture
with .get() -> bytes moved, defaults.set({...}) / set(key, value) returning a context manager that restores the old
values on exit, defaults.get / is_compat_mode_preferred, CompatMode, cufile_driver.get, SummaryMonitor), doing POSIX
I/O on host buffers. As in kvikio, the settings are process-wide: a call without a task_size takes the default one,
and a handle takes the default compat mode when it opens and keeps it. It lets the kvikio backend's logic run in
`make test`; the real thing runs in `make test-gpu`."""

from __future__ import annotations

import enum
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest


class CompatMode(enum.IntEnum):  # kvikio's values (its C++ enum class CompatMode: OFF, ON, AUTO)
    OFF = 0
    ON = 1
    AUTO = 2


DEFAULTS: dict[str, Any] = {"num_threads": 1, "task_size": 4 << 20, "compat_mode": CompatMode.AUTO}
SETTINGS: dict[str, Any] = dict(DEFAULTS)  # kvikio.defaults, reset by install() for each test
MOVED = {"POSIX": 0}


@dataclass(frozen=True)
class Call:
    """One pread / pwrite as kvikio would run it: the task size it is split by, its handle's mode, the pool."""

    op: str
    path: str
    task_size: int
    compat_mode: CompatMode
    num_threads: int


CALLS: list[Call] = []


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
        self._path = path
        self._fd = os.open(path, modes[flags[0]] | os.O_CLOEXEC, 0o644)
        self.compat_mode = CompatMode(SETTINGS["compat_mode"])  # fixed at open, as kvikio's FileHandle does

    def __enter__(self) -> CuFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _record(self, op: str, task_size: int | None) -> None:
        task = SETTINGS["task_size"] if task_size is None else task_size
        CALLS.append(Call(op, self._path, task, self.compat_mode, SETTINGS["num_threads"]))

    def pread(self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None) -> IOFuture:
        view = _host_view(buf)
        size = view.nbytes if size is None else size
        if size > view.nbytes:
            raise ValueError("Size is greater than the size of the buffer")
        self._record("pread", task_size)
        data = os.pread(self._fd, size, file_offset)
        if len(data) < size:
            raise RuntimeError("POSIX error on pread: EOF")
        view[:size] = np.frombuffer(data, dtype=np.uint8)
        MOVED["POSIX"] += size
        return IOFuture(size)

    def pwrite(self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None) -> IOFuture:
        view = _host_view(buf)
        size = view.nbytes if size is None else size
        self._record("pwrite", task_size)
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


def _put(key: str, value: Any) -> None:
    if key not in SETTINGS:
        raise KeyError(key)
    if key in ("num_threads", "task_size") and int(value) < 1:
        raise ValueError(f"{key} must be a positive integer greater than zero")
    SETTINGS[key] = CompatMode(value) if key == "compat_mode" else value


class ConfigContextManager:
    """kvikio's: the settings apply at once; leaving a `with` block puts the old ones back."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._old: dict[str, Any] = {}
        for key, value in config.items():
            self._old[key] = SETTINGS[key]  # KeyError for a name kvikio does not have, as kvikio
            _put(key, value)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        for key, value in self._old.items():
            _put(key, value)


def _set(*config: Any) -> ConfigContextManager:
    if len(config) == 1 and isinstance(config[0], dict):
        return ConfigContextManager(config[0])
    if len(config) == 2 and isinstance(config[0], str):
        return ConfigContextManager({config[0]: config[1]})
    raise ValueError(
        "Valid arguments are kvikio.defaults.set(config: dict) or kvikio.defaults.set(key: str, value: Any)"
    )


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import kvikio` (and kvikio.defaults, kvikio.cufile_driver) give this fake for one test."""
    SETTINGS.clear()
    SETTINGS.update(DEFAULTS)
    CALLS.clear()
    kvikio = types.ModuleType("kvikio")
    defaults = types.ModuleType("kvikio.defaults")
    driver = types.ModuleType("kvikio.cufile_driver")
    defaults.set = _set  # type: ignore[attr-defined]
    defaults.get = SETTINGS.__getitem__  # type: ignore[attr-defined]
    # no cuFile library here: AUTO falls back to compat, as ON does; only OFF insists on cuFile
    defaults.is_compat_mode_preferred = lambda: SETTINGS["compat_mode"] != CompatMode.OFF  # type: ignore[attr-defined]
    driver.get = {"is_gds_available": False}.__getitem__  # type: ignore[attr-defined]
    kvikio.CuFile = CuFile  # type: ignore[attr-defined]
    kvikio.CompatMode = CompatMode  # type: ignore[attr-defined]
    kvikio.SummaryMonitor = SummaryMonitor  # type: ignore[attr-defined]
    kvikio.defaults = defaults  # type: ignore[attr-defined]
    kvikio.cufile_driver = driver  # type: ignore[attr-defined]
    for name, module in (("kvikio", kvikio), ("kvikio.defaults", defaults), ("kvikio.cufile_driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
