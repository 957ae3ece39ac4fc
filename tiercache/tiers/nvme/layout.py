"""Reading and writing the nvme tier's entries (the format is format.py's): atomic writes under tmp/, every file's
pieces read and checksummed in parallel by the I/O backend, removal through trash/, the index rebuilt on open."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import torch

from ...entry import EntrySpec, Tensors, TensorSpec, as_bytes, from_bytes
from ...errors import CorruptEntryError
from ...io import FileRead, PendingRead, PosixIO, buffer_of, round_up
from ...io.buffers import HostBuffers
from ...io.checksum import crc32c
from ...io.device_io import KvikioIO
from ...io.files import FileOps
from ...io.writer import WriterGone, WriterProcess
from ...units import format_size
from .failures import disk_error, disk_errors
from .format import (
    CHECKSUM_BYTES,
    ENTRY_NAME,
    StoredEntry,
    array_metadata,
    chunk_path,
    group_metadata,
    json_text,
    key_hash,
    parents_between,
    parse_group,
    write_json,
)

log = logging.getLogger(__name__)

WRITER_FROM = 4 << 20  # background writes of at least this many bytes go to the writer process; below, the GIL
# handoffs of writing here are too few to matter, and a cache that only writes small entries starts no process
COMPACT_BELOW = 256 << 10  # tensors read back smaller than this are copied out of their padded I/O buffers (their
# padding, at most 4 KiB a tensor, would otherwise add more than 1.6% to what a memory tier holds)


class DiskLayout:
    """Reads and writes entries under one root directory, which it holds locked while open."""

    def __init__(
        self,
        root: Path,
        io: PosixIO,
        device_io: KvikioIO | None = None,
        buffers: HostBuffers | None = None,
        files: FileOps | None = None,
    ) -> None:
        """`io` moves host memory; `device_io`, where given, moves tensors on `device_io.device` without the host. Reads
        land in `buffers` (a pool of this layout's own unless given: a cache shares one with its reloads). Names and
        metadata files go through `files` (by default `io.files`, so that both see the same disk)."""
        self.root = root
        self.io = io
        self.device_io = device_io
        self.files = files if files is not None else io.files
        self.entries_dir = root / "entries"
        self.tmp_dir = root / "tmp"
        self.trash_dir = root / "trash"
        with disk_errors("opening", root, root):
            for d in (self.entries_dir, self.tmp_dir, self.trash_dir):
                self.files.mkdir(d, exist_ok=True)
            if not self.files.exists(self.entries_dir / "zarr.json"):
                group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
                write_json(self.entries_dir / "zarr.json", group, self.files)
        # Host memory that reads land in, reused once no tensor uses it.
        self.buffers = buffers if buffers is not None else HostBuffers()
        # Whole-file jobs (one tensor's write, one fsync); their pieces go to the I/O backend's own pool.
        self._jobs = ThreadPoolExecutor(max(2, io.threads), thread_name_prefix="tiercache-files")
        # Removed entries' files go on a thread of their own: unlinking a 1 GiB entry takes ~0.2 s, which a get that
        # happens to run the sweep would otherwise wait through. What a crash leaves in trash/ goes at the next open.
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="tiercache-remove")
        self._removing: set[Future[None]] = set()
        # Background writes go to a process of their own where they can (io/writer.py). Faults and delays injected
        # through a FileOps of the caller's are honoured by writing here, through it.
        self.writer = WriterProcess.attach()
        self._attached = True
        self._writes_here = type(self.files) is not FileOps or type(io.files) is not FileOps

    def close(self) -> None:
        self._jobs.shutdown(wait=True)
        self._remover.shutdown(wait=True)
        if self._attached:
            self._attached = False
            self.writer.detach()
        self.buffers.close()

    # ---- writing ----------------------------------------------------------------------------------------------
    @staticmethod
    def new_name(key: str) -> str:
        """A fresh directory name for a version of `key`: <H>-<U>."""
        return f"{key_hash(key)}-{uuid.uuid4().hex[:16]}"

    def stage(
        self,
        name: str,
        spec: EntrySpec,
        tensors: Iterable[torch.Tensor],
        written_ns: int | None = None,
        *,
        background: bool = False,
    ) -> StoredEntry:
        """Write an entry durably under tmp/<name>: every file written and fsynced, nothing visible in entries/ yet
        (`publish` does that); the manifest's `written_ns` is the version's own time where given. Tensors are
        written concurrently (each file's pieces go to the I/O pool), so an entry of many small tensors is not a
        queue of one-file-at-a-time round trips. A `background` write (nobody waits on it: a demotion, a flush,
        write-behind) of host tensors goes to the writer process where it can, off this process's GIL. A failure
        raises the entry's StorageError with nothing of it left."""
        tensors = list(tensors)
        if background and spec.nbytes >= WRITER_FROM and self.writer.usable and not self._writes_here:
            if all(t.device.type == "cpu" for t in tensors):
                staged = self._stage_in_writer(name, spec, tensors, written_ns)
                if staged is not None:
                    return staged
        for device in {t.device for t in tensors if t.is_cuda}:  # the files get what the producers' queued work wrote
            torch.cuda.current_stream(device).synchronize()
        staging = self.tmp_dir / name
        files = self.files
        with disk_errors("writing", self.root, staging, spec.key, spec.nbytes):
            self._check_room(spec)
            try:
                files.mkdir(staging)
                jobs = [
                    self._jobs.submit(self._write_array, staging / f"t{index}", index, tspec, tensor)
                    for index, (tspec, tensor) in enumerate(zip(spec.tensors, tensors, strict=True))
                ]
                wait(jobs)  # all of them, even after a failure: none may still be writing when staging is removed
                results = [job.result() for job in jobs]
                checksums = [checksum for checksum, _ in results]
                written_ns = time.time_ns() if written_ns is None else written_ns
                write_json(staging / "zarr.json", group_metadata(spec, checksums, written_ns), files, sync=False)
                # Data files were fsynced as written; make every new name durable before a rename publishes them.
                created = [staging, staging / "zarr.json", *(path for _, paths in results for path in paths)]
                list(self._jobs.map(files.fsync_path, created))
            except BaseException:
                files.remove_tree(staging)
                raise
        return StoredEntry(spec=spec, path=staging, checksums=tuple(checksums), written_ns=written_ns)

    def _stage_in_writer(
        self, name: str, spec: EntrySpec, tensors: list[torch.Tensor], written_ns: int | None
    ) -> StoredEntry | None:
        """`stage`, done by the writer process: the same files, fsynced in the same order; None when the process
        cannot do it (the caller then writes here)."""
        staging = self.tmp_dir / name
        direct = self.io.mode == "o_direct"
        steps: list[dict[str, object]] = [{"mkdir": str(staging)}]
        created = [staging]
        sources = []  # the bytes the child reads: alive until it has answered
        for index, (tspec, tensor) in enumerate(zip(spec.tensors, tensors, strict=True)):
            array_dir = staging / f"t{index}"
            steps += [
                {"mkdir": str(array_dir)},
                {"small": str(array_dir / "zarr.json"), "text": json_text(array_metadata(tspec, index))},
            ]
            created += [array_dir, array_dir / "zarr.json"]
            if tspec.nbytes == 0:  # an empty array has no chunks in zarr
                continue
            raw = as_bytes(tensor)
            sources.append(raw)
            chunk = chunk_path(array_dir, len(tspec.shape))
            parents = parents_between(chunk, array_dir)
            steps += [{"mkdir": str(parent)} for parent in reversed(parents)]
            created += parents
            steps.append({"chunk": str(chunk), "address": raw.data_ptr(), "nbytes": raw.numel(), "direct": direct})
        with disk_errors("writing", self.root, staging, spec.key, spec.nbytes):
            self._check_room(spec)
            try:
                crcs = iter(self.writer.run(steps))
                checksums = [next(crcs) if tspec.nbytes else None for tspec in spec.tensors]
                written_ns = time.time_ns() if written_ns is None else written_ns
                group = json_text(group_metadata(spec, checksums, written_ns))
                durable = [{"fsync": str(path)} for path in [*created, staging / "zarr.json"]]
                self.writer.run([{"small": str(staging / "zarr.json"), "text": group}, *durable])
            except WriterGone as exc:
                log.debug("tiercache: writing %r in this process: %s", spec.key, exc)
                self.files.remove_tree(staging)
                return None
            except BaseException:
                self.files.remove_tree(staging)
                raise
            finally:
                sources.clear()
        return StoredEntry(spec=spec, path=staging, checksums=tuple(checksums), written_ns=written_ns)

    def publish(self, staged: StoredEntry) -> StoredEntry:
        """Rename a staged entry into entries/ and make that durable; a failure raises with nothing published (the
        staged files are removed)."""
        final = self.entries_dir / staged.path.name
        spec = staged.spec
        with disk_errors("writing", self.root, staged.path, spec.key, spec.nbytes):
            try:
                self.files.rename(staged.path, final)
            except BaseException:
                self.files.remove_tree(staged.path)
                raise
            try:
                self.files.fsync_path(self.entries_dir)
            except OSError as exc:  # published but maybe not durable: take it back, never served
                if self.withdraw(final, spec.key):
                    raise
                raise disk_error(
                    "writing",
                    self.root,
                    final,
                    exc,
                    spec.key,
                    spec.nbytes,
                    outcome=f"It may remain at {final}: delete it",
                ) from exc
        return dataclasses.replace(staged, path=final)

    def discard(self, staging: Path) -> None:
        """Remove a staged entry that will not be published (never raises)."""
        self.files.remove_tree(staging)

    def remove_later(self, path: Path) -> None:
        """Remove a tree (in trash/ or tmp/, out of every reader's way) on the remover thread; never raises."""
        future = self._remover.submit(self.files.remove_tree, path)
        self._removing.add(future)
        future.add_done_callback(self._removing.discard)

    def in_background(self, job: Callable[[], None]) -> None:
        """Run `job` on the remover thread, after the removals queued before it (it must not raise)."""
        self._remover.submit(job)

    def _removed(self) -> None:
        """Wait for the removals handed to the remover thread so far."""
        wait(list(self._removing))

    def unpublish(self, stored: StoredEntry) -> None:
        """Remove an entry's metadata files, the manifest first, leaving its chunks: a zarr reader opening it from
        now on fails instead of reading fill values, while one that opened it a moment ago (and readers holding a
        lease) still read its chunks until `remove`. Never raises: a manifest left is removed with the rest."""
        metadata = [
            stored.path / "zarr.json",
            *(stored.path / f"t{i}" / "zarr.json" for i in range(len(stored.spec.tensors))),
        ]
        for path in metadata:
            with contextlib.suppress(OSError):
                self.files.unlink(path, missing_ok=True)

    def _check_room(self, spec: EntrySpec) -> None:
        """Refuse, before anything is written, an entry the filesystem has no room for (ENOSPC, with figures)."""
        need = spec.nbytes + len(spec.tensors) * (CHECKSUM_BYTES + 2 * 4096) + 4096  # data, checksums, metadata
        free = self.files.free_bytes(self.root)
        if free < need and self._removing:  # the room may be in files still being removed
            self._removed()
            free = self.files.free_bytes(self.root)
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"the filesystem has {format_size(free)} free and the entry needs about {format_size(need)}",
            )

    def _write_array(
        self, array_dir: Path, index: int, spec: TensorSpec, tensor: torch.Tensor
    ) -> tuple[int | None, list[Path]]:
        """Write one tensor's zarr array; returns its checksum and the paths it created (to fsync)."""
        self.files.mkdir(array_dir)
        write_json(array_dir / "zarr.json", array_metadata(spec, index), self.files, sync=False)
        created = [array_dir, array_dir / "zarr.json"]
        if spec.nbytes == 0:  # an empty array has no chunks in zarr
            return None, created
        on_device = self._serves(tensor.device)
        raw = as_bytes(tensor if on_device or tensor.device.type == "cpu" else tensor.cpu())
        checksum = self.device_io.checksum(raw) if on_device and self.device_io is not None else crc32c(raw)
        chunk = chunk_path(array_dir, len(spec.shape))
        self.files.mkdir(chunk.parent, parents=True, exist_ok=True)
        created += parents_between(chunk, array_dir)
        backend = self.device_io if on_device and self.device_io is not None else self.io
        backend.write_file(chunk, raw, trailer=checksum.to_bytes(CHECKSUM_BYTES, "little"))
        return checksum, created

    # ---- reading ----------------------------------------------------------------------------------------------
    def _serves(self, device: torch.device) -> bool:
        """Whether the device I/O backend moves data to and from `device` (kvikio, for the compute device)."""
        return self.device_io is not None and device == self.device_io.device

    def start_entry_read(
        self, stored: StoredEntry, verify: bool, device: torch.device | None = None
    ) -> Callable[[], Tensors]:
        """Allocate the entry's buffers in the calling thread and queue every file's reads; the returned call waits
        for them, checks them and returns the tensors (a prefetch waits for it in the background).

        Each file is queued on the I/O pool as soon as its buffer is cut (PosixIO.read_files); the threads that
        read a file also checksum it, so files are verified in parallel while others are still being read.
        """
        if device is not None and self._serves(device):
            return self._start_device_read(stored, verify, device)
        # Few, page-aligned regions, each file at a 4 KiB boundary: huge pages for entries of many small tensors
        # too (first-touch faults cost as much as the read on some VMs). Tensors kept as views share one region;
        # tensors copied out (small ones) read into another, dropped once they are copied.
        tensors = stored.spec.tensors
        spans = [round_up(t.nbytes + CHECKSUM_BYTES) if t.nbytes else 0 for t in tensors]
        kept = [t.nbytes >= COMPACT_BELOW for t in tensors]
        regions = {
            keep: self.buffers.empty(sum(span for span, k in zip(spans, kept, strict=True) if k == keep))
            for keep in (True, False)
        }
        offsets = {True: 0, False: 0}
        buffers: dict[int, torch.Tensor] = {}
        trailers: dict[int, memoryview] = {}  # each file's stored CRC, read without a torch call once it landed
        views = {keep: buffer_of(region) for keep, region in regions.items()}

        def file_reads() -> Iterator[FileRead]:  # consumed as it goes: the first file is read while others queue
            for index, (tspec, span) in enumerate(zip(tensors, spans, strict=True)):
                if tspec.nbytes:
                    start = offsets[kept[index]]
                    offsets[kept[index]] += span
                    buffers[index] = regions[kept[index]][start : start + span]
                    end = start + tspec.nbytes
                    trailers[index] = views[kept[index]][end : end + CHECKSUM_BYTES]
                    yield self._file_read(stored, index, buffers[index], verify)

        jobs = self.io.read_files(file_reads())
        landed = dict(zip(buffers, jobs, strict=True))
        return functools.partial(self._finish_entry, stored, buffers, trailers, landed, verify)

    def _finish_entry(
        self,
        stored: StoredEntry,
        buffers: dict[int, torch.Tensor],
        trailers: dict[int, memoryview],
        jobs: dict[int, PendingRead],
        verify: bool,
    ) -> Tensors:
        """Wait for every file (each closed before any error leaves), then verify and view them all. No torch call
        runs while reads are landing: each would hand the GIL to an I/O thread and wait to get it back."""
        try:
            _call_every([job.finish for job in jobs.values()])
        except BaseException:
            # The traceback keeps this frame (and a prefetch handle's) alive: let go of the buffers now.
            buffers.clear()
            trailers.clear()
            raise
        tensors: Tensors = {}
        for index, tspec in enumerate(stored.spec.tensors):
            if index not in buffers:  # empty: no file
                tensors[tspec.name] = torch.empty(tspec.shape, dtype=tspec.torch_dtype)
                continue
            if verify:
                self._verify(stored, index, jobs[index].digest, int.from_bytes(trailers[index], "little"))
            tensors[tspec.name] = self._tensor(stored, index, buffers[index])
        return tensors

    def start_read(
        self, stored: StoredEntry, index: int, verify: bool, device: torch.device | None = None
    ) -> Callable[[], torch.Tensor]:
        """Start reading one tensor into a buffer of its own (on `device` where the device I/O backend serves it);
        the returned call waits for it, checks it and returns it (layerwise streaming reads an entry this way, a
        few tensors ahead of its consumer)."""
        tspec = stored.spec.tensors[index]
        if tspec.nbytes == 0:
            return lambda: torch.empty(tspec.shape, dtype=tspec.torch_dtype, device=device)
        if device is not None and self._serves(device) and self.device_io is not None:
            buffer = self.device_io.empty(round_up(tspec.nbytes + CHECKSUM_BYTES))
            finish = self.device_io.read_file(stored.chunk_files[index], buffer, tspec.nbytes + CHECKSUM_BYTES)
            return functools.partial(self._landed_device, stored, index, buffer, finish, verify)
        buffer = self.buffers.empty(tspec.nbytes + CHECKSUM_BYTES)
        (job,) = self.io.read_files([self._file_read(stored, index, buffer, verify)])
        return functools.partial(self._settle, stored, index, buffer, job, verify)

    def start_reads(
        self, stored: StoredEntry, indices: Sequence[int], verify: bool, device: torch.device | None = None
    ) -> Callable[[], Tensors]:
        """Start reading the tensors at `indices`, each into a buffer of its own (start_read); the returned call
        waits for them all, every file settled before the first error is raised."""
        landing: list[Landing] = []
        try:
            for index in indices:
                landing.append(self.start_read(stored, index, verify, device))
        except BaseException:
            _settle_all(landing)
            raise
        return functools.partial(_collect, [stored.spec.tensors[i].name for i in indices], landing)

    def _start_device_read(self, stored: StoredEntry, verify: bool, device: torch.device) -> Callable[[], Tensors]:
        """Every file of the entry read at once by kvikio into one device region (each file at a 4 KiB offset, as
        GDS wants), then checked on the device."""
        assert self.device_io is not None
        spans = [round_up(t.nbytes + CHECKSUM_BYTES) if t.nbytes else 0 for t in stored.spec.tensors]
        region = self.device_io.empty(sum(spans))
        landing: list[Landing] = []
        offset = 0
        try:
            for index, (tspec, span) in enumerate(zip(stored.spec.tensors, spans, strict=True)):
                buffer = region[offset : offset + span]
                offset += span
                if tspec.nbytes == 0:
                    landing.append(functools.partial(torch.empty, tspec.shape, dtype=tspec.torch_dtype, device=device))
                    continue
                finish = self.device_io.read_file(stored.chunk_files[index], buffer, tspec.nbytes + CHECKSUM_BYTES)
                landing.append(functools.partial(self._landed_device, stored, index, buffer, finish, verify))
        except BaseException:
            _settle_all(landing)
            raise
        return functools.partial(_collect, [t.name for t in stored.spec.tensors], landing)

    def _landed_device(
        self, stored: StoredEntry, index: int, buffer: torch.Tensor, finish: Callable[[], None], verify: bool
    ) -> torch.Tensor:
        """Wait for kvikio's read, then check it and view or copy the tensor out on the backend's own stream,
        waiting for that too: a small tensor's copy is done before its buffer goes back to the allocator (where
        kvikio's next read, which no stream orders, may land in it), and its stored CRC is read without waiting
        for the caller's stream."""
        finish()
        assert self.device_io is not None
        with self.device_io.own_stream():
            if verify:
                nbytes = stored.spec.tensors[index].nbytes
                self._verify(stored, index, self.device_io.checksum(buffer[:nbytes]), _stored_crc(buffer, nbytes))
            return self._tensor(stored, index, buffer)

    def _file_read(self, stored: StoredEntry, index: int, buffer: torch.Tensor, verify: bool) -> FileRead:
        nbytes = stored.spec.tensors[index].nbytes
        return FileRead(stored.chunk_files[index], buffer, nbytes + CHECKSUM_BYTES, nbytes if verify else None)

    def _settle(
        self, stored: StoredEntry, index: int, buffer: torch.Tensor, job: PendingRead, verify: bool
    ) -> torch.Tensor:
        """Wait for one file's pieces (its file closed), verify its checksum, view its bytes as the tensor."""
        job.finish()
        if verify:
            self._verify(stored, index, job.digest, _stored_crc(buffer, stored.spec.tensors[index].nbytes))
        return self._tensor(stored, index, buffer)

    def _tensor(self, stored: StoredEntry, index: int, buffer: torch.Tensor) -> torch.Tensor:
        tspec = stored.spec.tensors[index]
        tensor = from_bytes(buffer, tspec)
        # A view keeps its region alive, with up to 4 KiB of padding and checksum per tensor: small tensors are
        # copied out (their region is then dropped), so that padding never outweighs data in a memory tier.
        return tensor.clone() if tspec.nbytes < COMPACT_BELOW else tensor

    def _verify(self, stored: StoredEntry, index: int, computed: int, trailer: int) -> None:
        """The CRC32C computed over a tensor's bytes must equal the one its file stores and the manifest's."""
        expected = stored.checksums[index]
        if computed != trailer or computed != expected:
            raise CorruptEntryError(
                f"entry {stored.spec.key!r}: tensor {stored.spec.tensors[index].name!r} in {stored.chunk_path(index)} "
                f"fails its checksum (computed crc32c {computed:#010x}, file says {trailer:#010x}, manifest says "
                f"{expected:#010x}); the data was not returned. Delete the entry and put it again."
            )

    # ---- removal and the index --------------------------------------------------------------------------------
    def withdraw(self, path: Path, key: str) -> bool:
        """Make sure the entry directory `path` is never served again, whatever the disk allows: removed (True), or
        else its manifest unlinked (the next open removes a directory without one). Never raises for a disk fault."""
        try:
            target = self._to_trash(path)
        except OSError as exc:
            first = exc
        else:
            if target is not None:
                with contextlib.suppress(OSError):
                    self.files.fsync_path(self.entries_dir)
                self.files.remove_tree(target)
            return True
        try:
            self.files.unlink(path / "zarr.json", missing_ok=True)
            self.files.fsync_path(path)
        except OSError as exc:
            log.error(
                "tiercache: entry %r at %s could be neither removed (%s) nor unpublished (%s): it may be served "
                "after the cache reopens; delete the directory by hand",
                key,
                path,
                first,
                exc,
            )
        return False

    def _to_trash(self, path: Path) -> Path | None:
        """Rename an entry directory out of entries/ into trash/ (recreating a missing trash/); None if it is
        already gone. A refused rename raises."""
        target = self.trash_dir / path.name
        try:
            self.files.rename(path, target)
        except FileNotFoundError:
            if not self.files.exists(path):
                return None
            self.files.mkdir(self.trash_dir, exist_ok=True)
            self.files.rename(path, target)
        return target

    def entry_names(self) -> list[str]:
        """The names of the directories in entries/ (entries published, or withdrawn and not yet removed)."""
        with disk_errors("opening", self.root, self.entries_dir):
            return sorted(n for n in self.files.listdir(self.entries_dir) if ENTRY_NAME.fullmatch(n))

    def parse(self, name: str) -> StoredEntry:
        """The entry in entries/<name>, its manifest verified (OSError or DamagedEntry, a ValueError, if not)."""
        return parse_group(self.entries_dir / name, self.files)

    def clear(self, folder: Path, keep: AbstractSet[str] = frozenset()) -> None:
        """Remove what tmp/ or trash/ holds but `keep` (writes in progress); never raises for a disk fault."""
        try:
            names = self.files.listdir(folder)
        except OSError:
            return
        for name in names:
            if name not in keep:
                self.files.remove_tree(folder / name)

    def remove_by_name(self, name: str) -> None:
        """Remove entries/<name> (rename into trash/, then the files); raises OSError if the rename is refused."""
        target = self.to_trash(name)
        if target is not None:
            self.files.remove_tree(target)

    def to_trash(self, name: str) -> Path | None:
        """Rename entries/<name> into trash/ (None if already gone); the caller removes the files."""
        return self._to_trash(self.entries_dir / name)


def _stored_crc(buffer: torch.Tensor, nbytes: int) -> int:
    """The CRC32C a chunk file stores after its `nbytes` of data, from the buffer it was read into."""
    stored = buffer[nbytes : nbytes + CHECKSUM_BYTES]
    return int.from_bytes(
        buffer_of(stored) if stored.device.type == "cpu" else stored.cpu().numpy().tobytes(), "little"
    )


T = TypeVar("T")
Landing = Callable[[], torch.Tensor]  # one tensor's read in flight: the call waits for it and returns it


def _settle_all(landing: Iterable[Landing]) -> None:
    """Wait for every started read (its file closed) before an error that stopped the starting leaves; their own
    errors are dropped: that one is raised."""
    for item in landing:
        try:
            item()
        except BaseException:  # noqa: BLE001
            pass


def _collect(names: list[str], landing: list[Landing]) -> Tensors:
    """The tensors of every started read, in order; every file is settled before the first error is raised."""
    return dict(zip(names, _call_every(landing), strict=True))


def _call_every(calls: Iterable[Callable[[], T]]) -> list[T]:
    """Every call's result, in order; all of them run (each read settled, its file closed) before the first error
    is raised."""
    results: list[T] = []
    first_error: BaseException | None = None
    for call in calls:
        try:
            results.append(call())
        except BaseException as exc:  # noqa: BLE001 - settle every call, then raise the first error
            first_error = first_error or exc
    if first_error is not None:
        try:
            raise first_error
        finally:  # no frame -> exception -> traceback -> frame cycle keeping buffers alive until the GC runs
            first_error = None
    return results
