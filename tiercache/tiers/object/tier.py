"""The object tier: entries in an S3 bucket, in the nvme tier's zarr v3 entry format, shared by every cache (on any
machine) that names the bucket, and durable.

    PREFIX/entries/zarr.json                  a zarr group whose members are the entries
    PREFIX/entries/<H>-<U>/t<i>/zarr.json     tensor i's array metadata            } written first, in parallel
    PREFIX/entries/<H>-<U>/t<i>/c/0/...       its one chunk: raw bytes + CRC32C    }
    PREFIX/entries/<H>-<U>/zarr.json          the sealed manifest, written last with create-if-absent: the commit

An entry exists for others once its manifest does; a removal deletes the manifest first, then the rest. Objects of
an entry with no manifest (a writer that died mid-put) are removed by the sweep once `orphan_age_s` old, as are
older versions of a key that a newer manifest replaced (a reader on another machine may still be reading one: its
read then fails its checksum or finds a chunk gone, which is a miss, never wrong data). Other caches' entries are
found by listing the bucket, once at open and then every `list_every_s` on a background thread, so a get never
waits for a listing. The budget is a quota over everything under the prefix, as last listed; two caches writing
at once may overshoot it by what they write in one listing's interval.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from ...entry import EntrySpec, Tensors, TensorSpec, as_bytes, from_bytes
from ...errors import CorruptEntryError, EntryNotFoundError, StorageError
from ...io.checksum import crc32c_address
from ...pathway import Pathway
from ...policy.schema import ObjectBudget, TierBudget
from ...transfer import Event, all_of
from ..base import DataPath, EntryId, Found, Load, Refresh, Tier, TierState, select
from ..nvme.format import (
    CHECKSUM_BYTES,
    ENTRY_NAME,
    DamagedEntry,
    StoredEntry,
    array_metadata,
    chunk_path,
    group_metadata,
    key_hash,
    parse_manifest,
)
from .store import Bucket, Exists, Listed, Missing

log = logging.getLogger("tiercache")
ENTRIES = "entries"
GROUP = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def manifest_path(name: str) -> str:
    """Entry `name`'s sealed manifest (its group's zarr.json): the object whose existence is the entry's."""
    return f"{ENTRIES}/{name}/zarr.json"


def array_path(name: str, index: int) -> str:
    """Tensor `index`'s array metadata in entry `name`."""
    return f"{ENTRIES}/{name}/t{index}/zarr.json"


@dataclass
class _Listing:
    """One pass over the bucket: every live entry by name (None: its manifest is damaged), and when it began."""

    entries: dict[str, StoredEntry | None]
    started: float


class ObjectTier(Tier):
    persistent = True
    shared = True

    def __init__(self, name: str, budget: ObjectBudget, path: DataPath) -> None:
        super().__init__(name, budget.capacity, path)
        self.budget = budget
        self.read_only = path.read_only
        # Touched under the cache's lock only (the engine's calls); the lister thread hands over `_pending` alone.
        self._stored: dict[EntryId, StoredEntry] = {}  # what this cache indexes, by entry id
        self._ids: dict[str, EntryId] = {}  # entry name -> id, for this cache's entries
        self._since: dict[str, float] = {}  # when this cache began to index each of those (monotonic)
        self._sizes: dict[str, int] = {}  # every live entry under the prefix (anyone's): the quota's count
        self._ignored: set[str] = set()  # found entries the engine did not take (an older version of a key)
        self._closed = False
        self._lock = threading.Lock()  # hands `_pending` from the lister thread over
        self._parsed: dict[str, StoredEntry | None] = {}  # the lister's: manifests read so far (None: damaged)
        self._writing: set[str] = set()  # this cache's puts not committed yet
        self._removed: dict[str, float] = {}  # entries this cache removed, and when (inf: its removal is retried)
        self._doomed: dict[str, StoredEntry] = {}  # released entries whose removal failed: the lister retries it
        self._pending: _Listing | None = None  # the latest listing, until refresh() takes it in
        # The first listing runs on the lister thread while the other tiers open; the cache's first refresh (still
        # inside its open) waits for it, so a handoff's entries are found before the open returns.
        self._listed_once = threading.Event()
        self._first_error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._parts: ThreadPoolExecutor | None = None
        self.bucket: Bucket | None = None
        if budget.capacity == 0:  # off: holds nothing, talks to nobody
            return
        self.bucket = Bucket(budget)
        self._pool = ThreadPoolExecutor(budget.concurrency, thread_name_prefix="tiercache-object")
        # the parts of one large chunk: a pool of their own, since the reads that wait for them run on _pool
        self._parts = ThreadPoolExecutor(budget.concurrency, thread_name_prefix="tiercache-object-part")
        if not self.read_only:
            with contextlib.suppress(Exists):
                self.bucket.put(f"{ENTRIES}/zarr.json", GROUP, create=True)  # also proves the credentials
        self._wake = threading.Event()
        self._lister = threading.Thread(target=self._list_forever, name="tiercache-object-lister", daemon=True)
        self._lister.start()

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> Tier:
        if not isinstance(budget, ObjectBudget):
            budget = ObjectBudget(capacity=budget.capacity, max_entry=budget.max_entry)
        return cls(name, budget, path)

    # ---- accounting ---------------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Every live entry under the prefix, whoever wrote it, as last listed (plus this cache's since)."""
        return sum(self._sizes.values())

    @property
    def writable(self) -> bool:
        return not self.read_only

    def describe(self) -> TierState:
        where = self.bucket.where if self.bucket is not None else "off (capacity 0)"
        return TierState(None, None, (f"object: {where}",))

    def reload_pathway(self) -> Pathway | None:
        return Pathway(self.name, "hbm").costed()

    # ---- store, load, delete -----------------------------------------------------------------------------------
    def put(
        self,
        entry: EntryId,
        spec: EntrySpec,
        tensors: Tensors,
        *,
        source: str,
        copy: bool,
        after: Event | None,
        written_ns: int | None = None,
    ) -> None:
        if self.read_only:
            raise StorageError(f"object tier: put({spec.key!r}): this cache opened its stores read-only")
        bucket, pool = self._bucket()
        name = f"{key_hash(spec.key)}-{uuid.uuid4().hex[:16]}"
        self._admit(entry, spec)  # the room is taken before the first byte goes up
        self._sizes[name] = spec.nbytes
        with self._lock:  # the lister's sweep reads it
            self._writing.add(name)
        start = time.perf_counter()
        written: list[str] = []
        manifest = manifest_path(name)
        try:
            if after is not None:
                after.synchronize()
            host = [as_bytes(tensors[t.name].detach().contiguous().cpu()) for t in spec.tensors]
            metas = [
                pool.submit(self._put_one, bucket, array_path(name, i), meta, written)
                for i, t in enumerate(spec.tensors)
                for meta in [json.dumps(array_metadata(t, i), indent=1).encode()]
            ]
            chunks = [pool.submit(self._put_chunk, bucket, name, i, t, raw, written) for i, (t, raw) in
                      enumerate(zip(spec.tensors, host, strict=True))]  # fmt: skip
            checksums = [future.result() for future in chunks]
            for future in metas:
                future.result()
            if time.perf_counter() - start > self.budget.orphan_age_s / 2:  # the sweep may have taken its chunks
                raise StorageError(
                    f"object tier: the upload took {time.perf_counter() - start:.0f} s, more than half of "
                    f"tiers.object.orphan_age_s ({self.budget.orphan_age_s:g} s), after which the sweep of any cache "
                    "may remove its objects; raise orphan_age_s"
                )
            stamp = written_ns or time.time_ns()
            try:  # the commit
                bucket.put(manifest, json.dumps(group_metadata(spec, checksums, stamp), indent=1).encode(), create=True)
            except Exists:  # a retry after our own commit landed (its reply lost): the name is ours alone
                pass
        except BaseException as exc:
            self._forget(entry)
            self._sizes.pop(name, None)
            with self._lock:
                self._writing.discard(name)
            self._remove_quietly([manifest])  # first: a commit whose reply was lost must not outlive its chunks
            self._remove_quietly(written)
            if isinstance(exc, StorageError):
                raise StorageError(
                    f"object tier: put({spec.key!r}) of {spec.nbytes} bytes did not commit; nothing of it is "
                    f"stored and the entries already stored are untouched: {exc}"
                ) from exc
            raise
        with self._lock:
            self._writing.discard(name)
        self._index(entry, StoredEntry(spec, Path(ENTRIES, name), tuple(checksums), stamp))
        self._log(source, self.name, spec.nbytes, time.perf_counter() - start)

    @staticmethod
    def _put_one(bucket: Bucket, path: str, data: bytes | list[memoryview], written: list[str]) -> None:
        bucket.put(path, data)
        written.append(path)

    def _put_chunk(
        self, bucket: Bucket, name: str, index: int, spec: TensorSpec, raw: torch.Tensor, written: list[str]
    ) -> int | None:
        """Checksum tensor `index` and write its chunk (on a pool thread: tensors in parallel); its CRC32C."""
        if not spec.nbytes:
            return None  # no chunk: zarr's fill value stands for an empty array
        crc = crc32c_address(raw.data_ptr(), raw.numel())
        trailer = crc.to_bytes(CHECKSUM_BYTES, "little")
        view = raw.numpy().data
        # small chunks go up whole (one request; the copy is cheap), large ones as parts, uncopied
        data = bytes(view) + trailer if spec.nbytes <= self.budget.part_size else [view, memoryview(trailer)]
        self._put_one(bucket, str(chunk_path(Path(f"{ENTRIES}/{name}/t{index}"), len(spec.shape))), data, written)
        return crc

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        stored = self._stored[entry]
        indices = select(stored.spec, names)
        bucket, pool = self._bucket()
        start = time.perf_counter()
        fetches = [pool.submit(self._fetch, bucket, stored, i) for i in indices]

        def finish() -> tuple[Tensors, Event]:
            out: Tensors = {}
            try:
                for i, fetch in zip(indices, fetches, strict=True):
                    spec = stored.spec.tensors[i]
                    tensor = from_bytes(fetch.result(), spec)
                    out[spec.name] = tensor if device is None or device.type == "cpu" else tensor.to(device)
            except BaseException:
                for fetch in fetches:
                    fetch.cancel()
                raise
            nbytes = sum(stored.spec.tensors[i].nbytes for i in indices)
            dest = "host" if device is None else self.path.endpoint(device)
            self._log(self.name, dest, nbytes, time.perf_counter() - start)
            return out, all_of(())

        return Load(finish=finish)

    def _fetch(self, bucket: Bucket, stored: StoredEntry, index: int) -> torch.Tensor:
        """Tensor `index`'s bytes in a new host buffer, its checksum verified; parts of a large chunk in parallel."""
        spec = stored.spec.tensors[index]
        out = torch.empty(spec.nbytes, dtype=torch.uint8)
        if not spec.nbytes:
            return out
        path, total = stored.chunk_files[index], spec.nbytes + CHECKSUM_BYTES
        part = self.budget.part_size
        starts = list(range(0, total, part))
        try:
            if len(starts) == 1:
                pieces = [bucket.get_range(path, 0, total)]
            else:  # one request per part, in parallel, each under its own timeout
                assert self._parts is not None
                futures = [self._parts.submit(bucket.get_range, path, s, min(s + part, total)) for s in starts]
                pieces = [future.result() for future in futures]
        except Missing:
            self._wake.set()  # list again now: a newer version of the key may have replaced it
            raise EntryNotFoundError(
                f"object tier: entry {stored.spec.key!r} was removed or replaced by another cache while it was "
                f"read ({path} is gone): a miss; a get after the next listing finds a newer version"
            ) from None
        view, crc, at = out.numpy().data, 0, 0
        if sum(len(p) for p in pieces) != total:
            raise self._corrupt(stored, index, f"{path} holds {sum(len(p) for p in pieces)} bytes, not {total}")
        for piece in pieces:
            take = max(0, min(len(piece), spec.nbytes - at))
            if take:
                view[at : at + take] = piece[:take]
                if self.budget.verify_checksums:
                    crc = crc32c_address(piece[:take], crc=crc)
            at += len(piece)
        # the stored checksum: the last 4 bytes, which may straddle the last two pieces (parts are >= 5 MiB)
        trailer = b"".join(bytes(p[-CHECKSUM_BYTES:]) for p in pieces[-2:])[-CHECKSUM_BYTES:]
        if self.budget.verify_checksums:
            want = stored.checksums[index]
            if crc != want or int.from_bytes(trailer, "little") != want:
                raise self._corrupt(stored, index, f"CRC32C {crc:#010x}, the manifest says {want:#010x}")
        return out

    def _corrupt(self, stored: StoredEntry, index: int, what: str) -> CorruptEntryError:
        return CorruptEntryError(
            f"object tier: entry {stored.spec.key!r}, tensor {stored.spec.tensors[index].name!r}: {what}; the entry "
            f"is not served (in {self.budget.url}: delete it, or put it again)"
        )

    def delete(self, entry: EntryId) -> None:
        stored = self._stored[entry]
        if self.read_only:
            raise StorageError(f"object tier: delete({stored.spec.key!r}): this cache opened its stores read-only")
        bucket, pool = self._bucket()
        name = stored.path.name
        bucket.delete([manifest_path(name)])  # the entry is gone for everyone from here on
        self._removed[name] = time.monotonic()  # a listing begun before must not bring it back
        self._drop(entry, name)
        pool.submit(self._remove_quietly, self._objects_of(stored))  # its objects: no caller waits on them

    def release(self, entry: EntryId) -> None:
        try:
            self.delete(entry)
        except StorageError as exc:  # the lister deletes it again; never served or found again meanwhile
            log.warning("tiercache: %s (the object tier retries the removal)", exc)
            if entry in self._stored:
                stored = self._stored[entry]
                with self._lock:
                    self._doomed[stored.path.name] = stored
                self._removed[stored.path.name] = float("inf")
                self._unindex(entry)

    def _index(self, entry: EntryId, stored: StoredEntry) -> None:
        name = stored.path.name
        self._stored[entry], self._ids[name], self._since[name] = stored, entry, time.monotonic()
        self._sizes[name] = stored.spec.nbytes

    def _unindex(self, entry: EntryId) -> str:
        self._forget(entry)
        name = self._stored.pop(entry).path.name
        del self._ids[name], self._since[name]
        return name

    def _drop(self, entry: EntryId, name: str) -> None:
        self._unindex(entry)
        self._sizes.pop(name, None)

    def _objects_of(self, stored: StoredEntry) -> list[str]:
        name = stored.path.name
        paths = [array_path(name, i) for i in range(len(stored.spec.tensors))]
        return paths + [p for i, p in enumerate(stored.chunk_files) if stored.spec.tensors[i].nbytes]

    def _remove_quietly(self, paths: list[str]) -> None:
        if paths and self.bucket is not None:
            try:
                self.bucket.delete(paths)
            except StorageError as exc:  # orphans now: the sweep removes them once orphan_age_s old
                log.warning("tiercache: %s", exc)

    # ---- other caches' entries ---------------------------------------------------------------------------------
    def refresh(self) -> Refresh:
        """What the latest listing found (taken on the lister thread: no request here) that this cache lacks, and
        what it no longer lists of what this cache indexed before the listing began."""
        if self.bucket is not None and not self._listed_once.is_set():
            self._listed_once.wait()
        if self._first_error is not None:  # the open fails with it (once)
            error, self._first_error = self._first_error, None
            raise error
        with self._lock:
            listing, self._pending = self._pending, None
        if listing is None:
            return Refresh()
        entries = listing.entries
        found = [
            Found(stored.spec, stored.written_ns, stored)
            for name, stored in entries.items()
            if stored is not None
            and name not in self._ids
            and name not in self._ignored
            and self._removed.get(name, -1.0) < listing.started
        ]
        self._removed = {n: t for n, t in self._removed.items() if n in entries or t >= listing.started}
        found.sort(key=lambda f: f.written_ns)
        newer = {f.spec.key for f in found}
        gone = [uid for name, uid in self._ids.items() if name not in entries and self._since[name] < listing.started]
        deleted = [uid for uid in gone if self._stored[uid].spec.key not in newer]  # else replaced, not deleted
        for uid in gone:
            self._drop(uid, self._stored[uid].path.name)
        sizes = {name: stored.spec.nbytes for name, stored in entries.items() if stored is not None}
        ours = {n: self._sizes[n] for n in (*self._ids, *self._writing) if n not in entries and n in self._sizes}
        self._sizes = sizes | ours
        self._ignored &= set(entries)
        return Refresh(found, gone, deleted)

    def adopt(self, entry: EntryId, found: Found) -> None:
        stored: StoredEntry = found.handle
        self._specs[entry] = stored.spec  # stored already: its bytes are in the quota's count, whatever the budget
        self._index(entry, stored)

    def ignore(self, found: Found) -> None:
        self._ignored.add(found.handle.path.name)

    def _list(self, *, first: bool = False, sweep: bool = True) -> _Listing:
        """Every live entry under the prefix, its manifest read once per name and verified; then the sweep, on what
        the listing found. The `first` listing (at open, nothing known yet, every manifest to be read anyway) lists
        the entries' folders only: one request per 1000 entries, not per 1000 objects. Later ones list every object:
        a folder outlives its manifest (a removal deletes that first, and some servers keep empty folders)."""
        bucket, _ = self._bucket()
        started = time.monotonic()
        objects: list[Listed] = []
        if first:
            names = {folder.rsplit("/", 1)[-1] for folder in bucket.folders(f"{ENTRIES}/")}
        else:
            objects = list(bucket.objects(f"{ENTRIES}/"))
            names = {o.path.split("/")[1] for o in objects if o.path.count("/") == 2 and o.path.endswith("/zarr.json")}
        entries: dict[str, StoredEntry | None] = {}
        for name in sorted(n for n in names if ENTRY_NAME.fullmatch(n)):
            try:
                entries[name] = self._parsed[name] if name in self._parsed else self._manifest(name)
            except Missing:  # not committed yet (a put in flight, or a writer that died), or removed since
                continue
        self._parsed = entries
        if objects and sweep and not self.read_only:
            self._retry_removals()
            self._sweep(objects, entries)
        return _Listing(entries, started)

    def _retry_removals(self) -> None:
        with self._lock:
            doomed = list(self._doomed.items())
        for name, stored in doomed:
            try:
                self._bucket()[0].delete([manifest_path(name), *self._objects_of(stored)])
            except StorageError:
                continue
            with self._lock:
                self._doomed.pop(name, None)

    def _manifest(self, name: str) -> StoredEntry | None:
        """The entry `name`'s manifest, verified; None where it is damaged (logged, never served); Missing if gone."""
        bucket, _ = self._bucket()
        try:
            return parse_manifest(bytes(bucket.get(manifest_path(name))), Path(ENTRIES, name))
        except DamagedEntry as exc:
            log.warning("tiercache: object tier: entry %s in %s is damaged, not served: %s", name, self.budget.url, exc)
            return None

    def _sweep(
        self,
        objects: list[Listed],
        entries: dict[str, StoredEntry | None],
        age: float | None = None,
        remove: bool = True,
    ) -> int:
        """Remove, once `age` (orphan_age_s) old: the objects of entries with no manifest (a writer died mid-put),
        or whose manifest is damaged, and the versions of a key that a newer one replaced (manifest first); never what
        a put of this cache is writing. Returns how many objects went (with
        `remove` False: would go, and nothing is removed)."""
        now, age = datetime.now(UTC), self.budget.orphan_age_s if age is None else age
        modified = {o.path: o.modified for o in objects}
        with self._lock:
            keep = {n for n, e in entries.items() if e is not None} | self._writing  # damaged entries go too
        orphans = [
            o.path
            for o in objects
            if o.path.count("/") > 1 and o.path.split("/")[1] not in keep and (now - o.modified).total_seconds() >= age
        ]
        newest: dict[str, StoredEntry] = {}
        for stored in (e for e in entries.values() if e is not None):
            best = newest.get(stored.spec.key)
            if best is None or stored.written_ns > best.written_ns:
                newest[stored.spec.key] = stored
        for stored in (e for e in entries.values() if e is not None):
            best = newest[stored.spec.key]
            committed = modified.get(manifest_path(best.path.name))
            if best is not stored and committed is not None and (now - committed).total_seconds() >= age:
                if remove:
                    self._remove_quietly([manifest_path(stored.path.name)])
                orphans += [manifest_path(stored.path.name), *self._objects_of(stored)]
        if remove:
            self._remove_quietly(orphans)
        return len(orphans)

    # ---- for the ops commands (tiercache ls / du / verify / gc s3://...) -------------------------------------
    def stored(self) -> list[StoredEntry]:
        """Every live entry under the prefix now (a listing of its own), oldest first; damaged ones left out."""
        entries = self._list(sweep=False).entries
        return sorted((e for e in entries.values() if e is not None), key=lambda e: e.written_ns)

    def damaged(self) -> list[str]:
        """Names of the entries whose manifest does not verify, as of the last listing."""
        return sorted(name for name, e in self._parsed.items() if e is None)

    def check(self, stored: StoredEntry) -> str | None:
        """Read every tensor of an entry and check its CRC32C: None when it verifies, else what is wrong."""
        bucket, _ = self._bucket()
        try:
            for index in range(len(stored.spec.tensors)):
                self._fetch(bucket, stored, index)
        except (CorruptEntryError, EntryNotFoundError) as exc:
            return str(exc)
        return None

    def collect(self, age_s: float, *, dry_run: bool = False) -> int:
        """Sweep now, with every object listed: what no manifest names, entries whose manifest is damaged, and
        replaced versions, once `age_s` old; how many objects went (`dry_run`: would go)."""
        listing = self._list(sweep=False)
        objects = list(self._bucket()[0].objects(f"{ENTRIES}/"))
        live: dict[str, StoredEntry | None] = {n: e for n, e in listing.entries.items() if e is not None}
        return self._sweep(objects, live, age_s, remove=not dry_run)

    def _list_forever(self) -> None:
        try:
            first = self._list(first=True)
            with self._lock:
                self._pending = first
        except BaseException as exc:  # noqa: BLE001 - handed to the first refresh, in the cache's open
            self._first_error = exc
        finally:
            self._listed_once.set()
        while True:
            self._wake.wait(self.budget.list_every_s)  # set: a read found an entry gone, or close()
            self._wake.clear()
            if self._closed:
                return
            try:
                listing = self._list()
            except StorageError as exc:  # the server is away: the next listing tries again
                log.warning("tiercache: %s", exc)
                continue
            except Exception:  # noqa: BLE001 - a thread of ours: say it, and go on listing
                log.exception("tiercache: object tier: listing %s failed", self.budget.url)
                continue
            with self._lock:
                self._pending = listing

    def _bucket(self) -> tuple[Bucket, ThreadPoolExecutor]:
        if self.bucket is None or self._pool is None:
            raise StorageError("object tier: off (tiers.object.capacity is 0); give it a capacity and a url")
        return self.bucket, self._pool

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bucket is not None:
            self._wake.set()
            self._lister.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # removals queued finish (a load's fetches are done by now)
        if self._parts is not None:
            self._parts.shutdown(wait=True)
        self._stored.clear()
        self._ids.clear()
        self._specs.clear()
