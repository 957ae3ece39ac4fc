"""The writer process's program (run by path with the parent's PID; it imports nothing of tiercache).

It reads one JSON request per line on stdin and answers one JSON line on stdout. A request is a list of steps,
done in order, stopping at the first that fails:
  {"mkdir": PATH}                                    create a directory
  {"small": PATH, "text": STR}                       create a small file holding STR (metadata)
  {"chunk": PATH, "address": A, "nbytes": N, "direct": BOOL}
        create PATH holding the N bytes at address A of the parent's memory (copied in with process_vm_readv: the
        parent's tensors stay where they are) and then their CRC32C as 4 little-endian bytes, and fsync it
  {"fsync": PATH}                                    make a file's or directory's contents durable
The answer is {"crc32c": [one per chunk step]} or {"error": {"errno", "strerror", "filename", "memory"}}, where
"memory" says process_vm_readv failed (this machine does not let the child read the parent's memory, for one).

Each chunk is copied in, checksummed and written one PIECE at a time, the copy of the next piece running on a
second thread while this one is written: one large O_DIRECT write keeps the drive's queue full. The child ignores
Ctrl-C (the parent waits for the request in flight) and ends when its stdin closes or its parent is gone.
"""

import ctypes
import errno
import json
import mmap
import os
import select
import signal
import sys
import threading
from typing import Any

import crc32c

PIECE = 32 << 20
ALIGN = 4096
CHECK_PARENT_S = 1.0

libc = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


libc.fallocate.restype = ctypes.c_int
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class ParentMemoryError(OSError):
    """process_vm_readv failed: the parent's memory, not the disk."""


def copy_in(parent: int, address: int, nbytes: int, into: int, path: str) -> None:
    done = 0
    while done < nbytes:
        local = IoVec(into + done, nbytes - done)
        remote = IoVec(address + done, nbytes - done)
        got = libc.process_vm_readv(parent, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            code = ctypes.get_errno()
            raise ParentMemoryError(code, f"process_vm_readv: {os.strerror(code)}")
        if got == 0:
            raise ParentMemoryError(5, "process_vm_readv: the parent's memory ended early")
        done += got


class Buffers:
    """Two page-aligned PIECE buffers (O_DIRECT wants aligned memory), each with room for the padded trailer."""

    def __init__(self) -> None:
        self.maps = [mmap.mmap(-1, PIECE + 2 * ALIGN) for _ in range(2)]
        self.bases = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.maps]


def reserve(fd: int, size: int) -> None:
    """Linux fallocate, as the in-process writer does: a full disk refuses here, before any byte is written; a
    filesystem that cannot is left alone (posix_fallocate would emulate it by writing every block)."""
    if libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))


def write_chunk(step: dict[str, Any], buffers: Buffers, parent: int) -> int:
    path, address, nbytes, direct = step["chunk"], step["address"], step["nbytes"], step["direct"]
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | (os.O_DIRECT if direct else 0), 0o644)
    starts = list(range(0, nbytes, PIECE))
    copied: list[BaseException | None] = [None]
    pending: threading.Thread | None = None

    def fetch(index: int) -> threading.Thread:
        start = starts[index]

        def run() -> None:
            try:
                copy_in(parent, address + start, min(PIECE, nbytes - start), buffers.bases[index % 2], path)
            except BaseException as exc:  # noqa: BLE001 - raised by the writing thread
                copied[0] = exc

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        reserve(fd, nbytes + 4)
        crc = 0
        pending = fetch(0)
        for index, start in enumerate(starts):
            if pending is not None:
                pending.join()
                pending = None
            if copied[0] is not None:
                raise copied[0]
            if index + 1 < len(starts):
                pending = fetch(index + 1)
            buffer = buffers.maps[index % 2]
            count = min(PIECE, nbytes - start)
            crc = crc32c.crc32c(memoryview(buffer)[:count], crc)
            length = count
            if index + 1 == len(starts):  # the trailer follows the data; O_DIRECT writes whole blocks, cut back below
                buffer[count : count + 4] = crc.to_bytes(4, "little")
                length = count + 4
                if direct:
                    padded = -(-length // ALIGN) * ALIGN
                    buffer[length:padded] = bytes(padded - length)
                    length = padded
            view = memoryview(buffer)[:length]
            written = 0
            while written < length:
                written += os.pwritev(fd, [view[written:]], start + written)
        if direct:
            os.ftruncate(fd, nbytes + 4)
        os.fsync(fd)
    except ParentMemoryError:
        raise
    except OSError as exc:
        if exc.filename is None:  # pwritev, fsync and the like do not name the file
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    finally:
        if pending is not None:  # a copy into the other buffer, which the next request reuses: let it end here
            pending.join()
        try:
            os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
    return crc


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(steps: list[dict[str, Any]], buffers: Buffers, parent: int) -> dict[str, Any]:
    checksums = []
    for step in steps:
        if "mkdir" in step:
            os.mkdir(step["mkdir"])
        elif "small" in step:
            fd = os.open(step["small"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # as FileOps.write_bytes
            try:
                data = step["text"].encode()
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)
        elif "chunk" in step:
            checksums.append(write_chunk(step, buffers, parent))
        elif "fsync" in step:
            fsync_path(step["fsync"])
        else:
            raise ValueError(f"unknown step {step!r}")
    return {"crc32c": checksums}


def requests(parent: int) -> Any:
    """The lines on stdin, until it closes or the parent is gone (its PID is no longer our parent's)."""
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], CHECK_PARENT_S)
        if os.getppid() != parent:
            return
        if not ready:
            continue
        data = os.read(0, 1 << 20)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = int(sys.argv[1])
    buffers = Buffers()
    for line in requests(parent):
        try:
            answer = run(json.loads(line), buffers, parent)
        except OSError as exc:
            error = {"errno": exc.errno, "strerror": exc.strerror or str(exc), "filename": exc.filename}
            answer = {"error": {**error, "memory": isinstance(exc, ParentMemoryError)}}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
