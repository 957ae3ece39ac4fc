"""The nvme tier's CUDA backend: kvikio `CuFile` reads and writes straight between GPU memory and files.

GPUDirect Storage where the driver and filesystem allow it; kvikio's compat mode (POSIX I/O through its own pinned
bounce buffers) otherwise. Which one runs is decided per process by kvikio ("AUTO"): we read it back and report it,
and count the bytes each backend carried with kvikio's `SummaryMonitor`. kvikio is imported only here, lazily, and
only where CUDA works (without libcuda.so.1 it imports, but every read raises); the POSIX backend stays the fallback.
Thread count and task size come from the policy: kvikio's default of one thread leaves an NVMe drive mostly idle.

kvikio's settings are process-wide defaults, read by any call or handle that does not name its own. So a backend
changes none of them for longer than it needs: its task size goes with every pread / pwrite, the compat mode kvikio
had when it opened is the one each of its handles opens in, and the one thread pool (kvikio has one per process) is
only ever grown to the threads asked for. Opening a second cache with other settings leaves the first one's as
they were; code of the caller's own that changes kvikio's defaults changes neither cache's task size or mode.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptEntryError, StorageError, caused_by
from .aligned import ALIGN, aligned_view
from .checksum import crc32c_anywhere


def why_not_kvikio(device: torch.device, *, forced: bool = False) -> str | None:
    """None where kvikio should move data to and from `device`; else the reason, in words. `forced` (the policy
    asks for kvikio) skips the CUDA check: the probe at open then tells whether kvikio can do I/O here."""
    if device.type != "cuda" and not forced:
        return f"the compute device is {device}, not a CUDA device"
    try:
        import kvikio  # noqa: F401, PLC0415 - optional: the cuda extra
    except ImportError as exc:
        return f"kvikio is not installed ({exc}); pip install 'tiercache-gpu[cuda13]' (or [cuda12] for CUDA 12)"
    except Exception as exc:  # noqa: BLE001 - kvikio 26 loads libcufile at import: a missing one raises RuntimeError
        return f"kvikio is installed but does not load ({type(exc).__name__}: {exc})"
    return None


class KvikioIO:
    """Whole-file reads into and writes from device buffers through kvikio's thread pool."""

    def __init__(self, directory: Path, device: torch.device, *, threads: int, task_size: int) -> None:
        import kvikio  # noqa: PLC0415
        import kvikio.cufile_driver  # noqa: PLC0415
        import kvikio.defaults  # noqa: PLC0415

        self._kvikio = kvikio
        self.device = device  # the memory it reads into and writes from; host memory goes through PosixIO
        # The stream this backend's own GPU work runs on (checksums, copies out of read buffers), and one that runs
        # nothing, which its buffers are allocated on (see empty() for why kvikio's writes into them are safe).
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._alloc_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # One device checksum at a time: they run on the one stream anyway, and each holds about 9x a 32 MiB slab
        # of temporaries (devcrc.py), which threads writing and reading at once would otherwise multiply.
        self._checksum_lock = threading.Lock()
        self.threads, self.task_size = threads, task_size
        _grow_thread_pool(kvikio, threads)
        self._compat_mode = kvikio.defaults.get("compat_mode")  # every handle of ours opens in it (see _open)
        self.gds_available = bool(_driver_property(kvikio, "is_gds_available"))
        # AUTO prefers cuFile whenever libcufile loads, but without the nvidia-fs driver cuFile itself falls back
        # to POSIX: call that compat too.
        self.mode = "gds" if self.gds_available and not kvikio.defaults.is_compat_mode_preferred() else "compat"
        self._monitor: Any = _monitor(kvikio)
        self._probe(directory)

    def _probe(self, directory: Path) -> None:
        """Write and read back one page from and into the device's memory (the path every transfer takes), so that
        a kvikio that cannot do I/O here fails at open, not mid-run."""
        path = directory / ".kvikio-probe"
        page = torch.arange(4096, dtype=torch.int32).to(torch.uint8).to(self.device)
        if page.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()
        try:
            with self._open(path, "w") as f:
                f.pwrite(_buffer(page), 4096, 0, self.task_size).get()
            back = self.empty(4096)
            with self._open(path, "r") as f:
                f.pread(_buffer(back), 4096, 0, self.task_size).get()
        except (RuntimeError, OSError, ValueError) as exc:
            raise StorageError(
                f"kvikio cannot read or write files in {directory}: {exc}; "
                "set tiers.nvme.backend = 'posix' in the policy (or 'auto', which falls back by itself)"
            ) from exc
        finally:
            path.unlink(missing_ok=True)
        if not torch.equal(back, page):
            raise StorageError(f"kvikio read back different bytes than it wrote in {directory}; use backend 'posix'")

    def _open(self, path: str | Path, flags: str) -> Any:
        """A CuFile in this backend's compat mode: kvikio fixes a handle's mode when it opens, from its defaults, so
        where they say otherwise now (another cache's mode, or the caller's) ours is set around the open."""
        defaults = self._kvikio.defaults
        with _DEFAULTS_LOCK:
            if defaults.get("compat_mode") == self._compat_mode:
                return self._kvikio.CuFile(str(path), flags)
            with defaults.set("compat_mode", self._compat_mode):
                return self._kvikio.CuFile(str(path), flags)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on the device for reads to fill, starting on a 4 KiB boundary (GDS reads straight into
        page-aligned memory only; the caching allocator aligns blocks to 512 bytes). Hand it to consumers with
        record_stream.

        kvikio writes into it outside every CUDA stream. The caching allocator hands out a block freed on the
        allocating stream as soon as the free is enqueued, and other streams' uses of it are kept by record_stream
        (consumers) or were waited for (own_stream); so once the allocating stream has drained, nothing enqueued
        before the block's free can still read it. That stream runs nothing of ours, so the wait is free, unless
        torch lent it to someone else too (it hands out streams from a pool of 32): then it is needed."""
        if self._alloc_stream is None:
            return aligned_view(torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=self.device), nbytes)
        with torch.cuda.stream(self._alloc_stream):
            buffer = aligned_view(torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=self.device), nbytes)
        self._alloc_stream.synchronize()
        return buffer

    @contextlib.contextmanager
    def own_stream(self) -> Iterator[None]:
        """Run the torch work inside on this backend's stream and wait for it at the end: a read's checks and the
        copies out of its buffer are done when it returns (its buffer can go back to the allocator, and its
        tensors need no event), without waiting for the consumer's compute on its own stream."""
        if self._stream is None:
            yield
            return
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:  # an error too: nothing may still read a buffer once it goes back to the allocator
            self._stream.synchronize()

    def checksum(self, data: torch.Tensor) -> int:
        """CRC32C of device bytes, computed on this backend's own stream: on the legacy default stream a prefetch
        thread's check would queue behind the consumer's compute."""
        with self._checksum_lock, self.own_stream():
            return crc32c_anywhere(data)

    @property
    def label(self) -> str:
        """The pathway's name for this backend: "gds" or "compat" (kvikio's POSIX path)."""
        return self.mode

    def bytes_by_backend(self) -> dict[str, int]:
        """Bytes kvikio moved per backend ("GDS", "POSIX") since the cache opened; {} where kvikio cannot say."""
        if self._monitor is None:
            return {}
        try:
            summary = self._monitor.get()
            return {name: int(totals["bytes_transferred"]) for name, totals in summary.by_backend.items()}
        except (AttributeError, KeyError, TypeError, RuntimeError):
            return {}

    def read_file(self, path: str | Path, dest: torch.Tensor, size: int) -> Callable[[], None]:
        """Start reading the `size` bytes of `path` into `dest` (a contiguous uint8 buffer); the returned call
        waits for them and closes the file."""
        try:
            actual = os.stat(path).st_size
        except OSError as exc:
            raise caused_by(StorageError(f"cannot open {path}: {exc}"), exc) from exc
        if actual != size:
            raise CorruptEntryError(f"{path} holds {actual} bytes, its manifest says {size}")
        handle = self._open(path, "r")
        try:
            future = handle.pread(_buffer(dest[:size]), size, 0, self.task_size)
        except BaseException:
            handle.close()
            raise

        def finish() -> None:
            try:
                got = future.get()
            except RuntimeError as exc:
                raise caused_by(StorageError(f"reading {path} through kvikio failed: {exc}"), exc) from exc
            finally:
                handle.close()
            if got != size:
                raise CorruptEntryError(f"{path}: read {got} bytes, expected {size}; the file was truncated")

        return finish

    def write_file(self, path: Path, data: torch.Tensor, trailer: bytes = b"") -> None:
        """Create `path` holding `data` (contiguous uint8, its producers already synchronized) then `trailer`, and
        fsync it. The trailer (4 bytes of checksum) is written from host memory after the bulk."""
        try:
            with self._open(path, "w") as handle:
                if data.numel():
                    got = handle.pwrite(_buffer(data), data.numel(), 0, self.task_size).get()
                    if got != data.numel():
                        raise StorageError(f"{path}: wrote {got} of {data.numel()} bytes")
            fd = os.open(path, os.O_WRONLY)
            try:
                if trailer:
                    os.pwrite(fd, trailer, data.numel())
                os.fsync(fd)
            finally:
                os.close(fd)
        except (RuntimeError, OSError) as exc:
            raise caused_by(
                StorageError(f"writing {data.numel() + len(trailer)} bytes to {path} failed: {exc}"), exc
            ) from exc


# kvikio.defaults.set is a read of the old value then a write: our changes to the defaults, and the opens that must
# see them, happen one at a time across every backend in the process.
_DEFAULTS_LOCK = threading.Lock()


def _grow_thread_pool(kvikio: Any, threads: int) -> None:
    """At least `threads` threads in kvikio's one pool, never fewer than it had: a cache that asks for fewer than
    an open one leaves that one's reads as parallel as they were (an idle thread costs next to nothing)."""
    with _DEFAULTS_LOCK:
        if kvikio.defaults.get("num_threads") < threads:
            kvikio.defaults.set("num_threads", threads)


def _buffer(tensor: torch.Tensor) -> Any:
    """What kvikio accepts: a CUDA tensor as it is (it exports __cuda_array_interface__), host memory as numpy."""
    return tensor if tensor.is_cuda else tensor.numpy()


def _driver_property(kvikio: Any, name: str) -> Any:
    try:
        return kvikio.cufile_driver.get(name)
    except (RuntimeError, KeyError, AttributeError):  # no cuFile library: no GDS
        return False


def _monitor(kvikio: Any) -> Any:
    try:
        return kvikio.SummaryMonitor()
    except (AttributeError, RuntimeError):  # an older kvikio without statistics
        return None
