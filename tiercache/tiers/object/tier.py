"""The object tier: entries in an S3 bucket, in the nvme tier's zarr v3 entry format, shared by every cache (on any
machine) that names the bucket, and durable. The bucket is one `Store` (store.py: s3.py); the remote tier is this
tier over another (a Mooncake Store), so everything below holds for both, in their stores' terms.

    PREFIX/entries/zarr.json                  a zarr group whose members are the entries
    PREFIX/entries/<H>-<U>/t<i>/zarr.json     tensor i's array metadata            } written first, in parallel
    PREFIX/entries/<H>-<U>/t<i>/c/0/...       its one chunk: raw bytes + CRC32C    }  (as the store lays it out)
    PREFIX/entries/<H>-<U>/zarr.json          the sealed manifest, written last with create-if-absent: the commit

An entry exists for others once its manifest does; a removal deletes the manifest first, then the rest. Objects of
an entry with no manifest (a writer that died mid-put) are removed by the sweep once `orphan_age_s` old. A version
of a key that a newer one replaced stays for `keep_replaced_s` after the newer one's commit, for readers on other
machines that hold it (a read that outlasts it fails its checksum or finds a chunk gone: a miss, never wrong data),
outside the quota; then the sweep removes it, and a delete of the key removes it at once, or it would come back.
Other caches' entries are found by listing the bucket on a background thread: at open the entries' names (one
request per 1000 entries, which the open waits for: it also proves the credentials), then their manifests, then
everything every `list_every_s`. Until the manifests are read, a get looks its own key's up (the name starts with
the key's hash), so a fresh process's first get costs the same in a bucket of ten entries or ten thousand; what
needs every entry (keys(), a put's quota) waits for them. Both waits let go of the cache's lock. The budget is a
quota over each key's newest entry under the prefix, as last listed; two caches writing at once may overshoot it by
what they write in one listing's interval.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import torch

from ...entry import EntrySpec, Tensors, TensorSpec, as_bytes, from_bytes
from ...errors import CorruptEntryError, EntryNotFoundError, StorageError
from ...io.checksum import crc32c_address
from ...pathway import Pathway
from ...policy.schema import ObjectBudget, StoreBudget, TierBudget
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
    json_text,
    key_hash,
    parse_manifest,
)
from .s3 import Bucket
from .store import Damaged, Exists, Listed, Missing, Store

log = logging.getLogger("tiercache")
ENTRIES = "entries"
TOMBSTONE = "removed"  # in a volatile store, beside a removed entry's manifest: a cache removed it (it was not lost)
# What check() reads at once: an entry larger than this is verified a batch of its tensors at a time (a tensor
# larger than it alone), so verifying a bucket of model weights holds one batch in memory, not a whole entry.
CHECK_BATCH = 256 << 20
GROUP = json_text({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def check_batches(tensors: Sequence[TensorSpec], batch_bytes: int) -> list[list[int]]:
    """The tensors' indices in order, cut into runs of at most `batch_bytes` (a larger tensor is a run alone)."""
    batches: list[list[int]] = [[]]
    held = 0
    for index, tensor in enumerate(tensors):
        if batches[-1] and held + tensor.nbytes > batch_bytes:
            batches.append([])
            held = 0
        batches[-1].append(index)
        held += tensor.nbytes
    return [batch for batch in batches if batch]


def newest_versions(entries: dict[str, StoredEntry | None]) -> dict[str, StoredEntry]:
    """Of entries by name (None: damaged), each key's newest version."""
    newest: dict[str, StoredEntry] = {}
    for stored in (e for e in entries.values() if e is not None):
        best = newest.get(stored.spec.key)
        if best is None or stored.written_ns > best.written_ns:
            newest[stored.spec.key] = stored
    return newest


def manifest_path(name: str) -> str:
    """Entry `name`'s sealed manifest (its group's zarr.json): the object whose existence is the entry's."""
    return f"{ENTRIES}/{name}/zarr.json"


def array_path(name: str, index: int) -> str:
    """Tensor `index`'s array metadata in entry `name`."""
    return f"{ENTRIES}/{name}/t{index}/zarr.json"


@dataclass
class _Listing:
    """One pass over the store: every live entry by name (None: its manifest is damaged), when it began, and the
    entries removed by a cache (a volatile store's tombstones)."""

    entries: dict[str, StoredEntry | None]
    started: float
    tombstones: frozenset[str] = frozenset()


class ObjectTier(Tier):
    persistent = True
    durable = True
    shared = True
    budget_type: ClassVar[type[StoreBudget]] = ObjectBudget  # the policy section's type

    def __init__(self, name: str, budget: StoreBudget, path: DataPath) -> None:
        super().__init__(name, budget.capacity, path)
        self.budget = budget
        self.read_only = path.read_only
        # Touched under the cache's lock only (the engine's calls); the lister thread hands over `_pending` alone.
        self._stored: dict[EntryId, StoredEntry] = {}  # what this cache indexes, by entry id
        self._ids: dict[str, EntryId] = {}  # entry name -> id, for this cache's entries
        self._since: dict[str, float] = {}  # when this cache began to index each of those (monotonic)
        self._sizes: dict[str, int] = {}  # every live entry under the prefix (anyone's): the quota's count
        self._ignored: set[str] = set()  # found entries the engine did not take (an older version of a key)
        # versions a newer one replaced, left for the sweep (supersede), and since when (monotonic)
        self._superseded: dict[str, tuple[StoredEntry, float]] = {}
        self._closed = False
        self._lock = threading.Lock()  # what the lister thread hands over: `_pending`, `_list_error`
        self._parsed: dict[str, StoredEntry | None] = {}  # the lister's: manifests read so far (None: damaged)
        self._writing: set[str] = set()  # this cache's puts not committed yet
        self._removed: dict[str, float] = {}  # entries this cache removed, and when (inf: its removal is retried)
        # released entries whose removal failed, each with its older versions (newest last): the lister retries
        self._doomed: dict[str, list[StoredEntry]] = {}
        self._pending: _Listing | None = None  # the latest listing, until refresh() takes it in
        self._lost: set[str] = set()  # entries a read found gone (removed, replaced, their holder dead)
        # The lister thread first lists the entries' names while the other tiers open (the cache's first refresh,
        # still inside its open, waits for them: `_named`), then, after list_every_s or when wait_listed() asks,
        # lists everything; find() stands in for that listing until a refresh takes it in (`_whole`).
        # the entries' names at open, by their key's hash (what find() looks up); written before `_named` is set
        self._versions: dict[str, list[str]] = {}
        self._unreadable: set[str] = set()  # names find() found damaged or uncommitted: not looked up again
        self._named = threading.Event()
        self._listed_once = threading.Event()
        self._whole = False
        self._first_error: BaseException | None = None  # the names' listing failed: the open fails with it
        self._list_error: StorageError | None = None  # the last listing failed (None once one succeeds)
        self.bucket = self.connect(budget)  # a policy's capacity 0 opens no ObjectTier at all (tiers/off.py)
        self._pool = ThreadPoolExecutor(budget.concurrency, thread_name_prefix=f"tiercache-{name}")
        # a read's checksums, in parallel: a pool of their own, since the read that waits for them runs on _pool
        self._checksums = ThreadPoolExecutor(budget.concurrency, thread_name_prefix=f"tiercache-{name}-crc")
        # the lister's manifest reads: a pool of their own, so that a get never queues behind a bucket's worth
        self._manifests = ThreadPoolExecutor(budget.concurrency, thread_name_prefix=f"tiercache-{name}-list")
        try:
            if not self.read_only:
                with contextlib.suppress(Exists):
                    self.bucket.put(f"{ENTRIES}/zarr.json", GROUP, create=True)  # also proves the credentials
        except BaseException:
            self._pool.shutdown()
            self._checksums.shutdown()
            self._manifests.shutdown()
            self.bucket.close()
            raise
        self._wake = threading.Event()
        self._lister = threading.Thread(target=self._list_forever, name=f"tiercache-{name}-lister", daemon=True)
        self._lister.start()

    @classmethod
    def connect(cls, budget: StoreBudget) -> Store:
        """The store a tier with a capacity keeps its entries in."""
        assert isinstance(budget, ObjectBudget)
        return Bucket(budget)

    @classmethod
    def open(cls, name: str, budget: TierBudget, path: DataPath) -> Tier:
        if not isinstance(budget, cls.budget_type):
            budget = cls.budget_type(capacity=budget.capacity, max_entry=budget.max_entry)
        return cls(name, budget, path)

    # ---- accounting ---------------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Every live entry under the prefix, whoever wrote it, as last listed (plus this cache's since); until the
        first listing is taken in (wait_listed), only what this cache has found and put."""
        return sum(self._sizes.values())

    @property
    def writable(self) -> bool:
        return not self.read_only

    def describe(self) -> TierState:
        return TierState(None, None, (f"{self.name}: {self._where}",))

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
            raise StorageError(f"{self.name} tier: put({spec.key!r}): this cache opened its stores read-only")
        bucket, pool = self.bucket, self._pool
        name = f"{key_hash(spec.key)}-{uuid.uuid4().hex[:16]}"
        self._admit(entry, spec)  # the room is taken before the first byte goes up
        self._sizes[name] = spec.nbytes
        with self._lock:  # the lister's sweep reads it
            self._writing.add(name)
        start = time.perf_counter()
        written: list[str] = []
        manifest = manifest_path(name)
        try:
            # the slow part, outside the cache's lock (the room is taken already): other gets and puts go on
            with self.path.unlocked():
                try:
                    checksums, stamp = self._upload(bucket, pool, name, spec, tensors, after, written, written_ns)
                except BaseException:
                    self._remove_quietly([manifest])  # first: a commit whose reply was lost must not outlive its chunks
                    self._remove_quietly(written)
                    raise
        except BaseException as exc:
            self._forget(entry)
            self._sizes.pop(name, None)
            with self._lock:
                self._writing.discard(name)
            if isinstance(exc, StorageError):
                raise StorageError(
                    f"{self.name} tier: put({spec.key!r}) of {spec.nbytes} bytes did not commit; nothing of it is "
                    f"stored and the entries already stored are untouched: {exc}"
                ) from exc
            raise
        with self._lock:
            self._writing.discard(name)
        self._index(entry, StoredEntry(spec, Path(ENTRIES, name), tuple(checksums), stamp))
        self._log(source, self.name, spec.nbytes, time.perf_counter() - start)

    def _upload(
        self,
        bucket: Store,
        pool: ThreadPoolExecutor,
        name: str,
        spec: EntrySpec,
        tensors: Tensors,
        after: Event | None,
        written: list[str],
        written_ns: int | None,
    ) -> tuple[list[int | None], int]:
        """Write entry `name`'s objects, its manifest last (the commit); its checksums and time stamp."""
        start = time.perf_counter()
        if after is not None:
            after.synchronize()
        host = [as_bytes(tensors[t.name].detach().contiguous().cpu()) for t in spec.tensors]
        metas = [
            pool.submit(self._put_one, bucket, array_path(name, i), meta, written)
            for i, t in enumerate(spec.tensors)
            for meta in [json_text(array_metadata(t, i)).encode()]
            if bucket.zarr_arrays
        ]
        checksums = list(pool.map(self._checksum, host))  # in parallel: the CRC32C runs without the GIL
        bucket.put_chunks(
            [(self._chunk(name, i, t), raw, crc.to_bytes(CHECKSUM_BYTES, "little"))
             for i, (t, raw, crc) in enumerate(zip(spec.tensors, host, checksums, strict=True)) if crc is not None],
            written,
        )  # fmt: skip
        for future in metas:
            future.result()
        if time.perf_counter() - start > self.budget.orphan_age_s / 2:  # the sweep may have taken its chunks
            raise StorageError(
                f"{self.name} tier: the upload took {time.perf_counter() - start:.0f} s, more than half of "
                f"tiers.{self.name}.orphan_age_s ({self.budget.orphan_age_s:g} s), after which the sweep of any "
                "cache may remove its objects; raise orphan_age_s"
            )
        stamp = written_ns or time.time_ns()
        try:  # the commit
            bucket.put(manifest_path(name), json_text(group_metadata(spec, checksums, stamp)).encode(), create=True)
        except Exists:  # a retry after our own commit landed (its reply lost): the name is ours alone
            pass
        return checksums, stamp

    @staticmethod
    def _put_one(bucket: Store, path: str, data: bytes, written: list[str]) -> None:
        bucket.put(path, data)
        written.append(path)

    @staticmethod
    def _checksum(raw: torch.Tensor) -> int | None:
        """A tensor's CRC32C; None for an empty one, which has no chunk (zarr's fill value stands for it)."""
        return crc32c_address(raw.data_ptr(), raw.numel()) if raw.numel() else None

    @staticmethod
    def _chunk(name: str, index: int, spec: TensorSpec) -> str:
        return str(chunk_path(Path(f"{ENTRIES}/{name}/t{index}"), len(spec.shape)))

    def load(self, entry: EntryId, device: torch.device | None, names: Sequence[str] | None = None) -> Load:
        stored = self._stored[entry]
        indices = select(stored.spec, names)
        bucket, pool = self.bucket, self._pool
        start = time.perf_counter()
        fetch = pool.submit(self._fetch, bucket, stored, indices)

        def finish() -> tuple[Tensors, Event]:
            out: Tensors = {}
            for i, raw in zip(indices, fetch.result(), strict=True):
                spec = stored.spec.tensors[i]
                tensor = from_bytes(raw, spec)
                out[spec.name] = tensor if device is None or device.type == "cpu" else tensor.to(device)
            nbytes = sum(stored.spec.tensors[i].nbytes for i in indices)
            dest = "host" if device is None else self.path.endpoint(device)
            self._log(self.name, dest, nbytes, time.perf_counter() - start)
            return out, all_of(())

        return Load(finish=finish)

    def _fetch(self, bucket: Store, stored: StoredEntry, indices: list[int]) -> list[torch.Tensor]:
        """The bytes of the tensors `indices` in host buffers, their checksums verified; all chunks in one call to
        the store (which reads them, and a large one's parts, in parallel)."""
        buffers = self.path.buffers
        specs = [stored.spec.tensors[i] for i in indices]
        # reused buffers: fresh memory would be faulted in (and zeroed) by the first write of every page
        outs = [
            buffers.empty(t.nbytes)[: t.nbytes] if buffers is not None else torch.empty(t.nbytes, dtype=torch.uint8)
            for t in specs
        ]
        wanted = [(i, out) for i, out in zip(indices, outs, strict=True) if out.numel()]
        try:
            trailers = bucket.read_chunks([(stored.chunk_files[i], out) for i, out in wanted])
        except Missing as exc:
            with self._lock:  # the next refresh drops it, whatever a listing begun before says
                self._lost.add(stored.path.name)
            self._wake.set()  # list again now: a newer version of the key may have replaced it
            raise EntryNotFoundError(
                f"{self.name} tier: entry {stored.spec.key!r} was removed, replaced or lost while it was read "
                f"({exc}): a miss; a get after the next listing finds a newer version if there is one"
            ) from None
        except StorageError as exc:
            nbytes = sum(out.numel() for _, out in wanted)
            raise StorageError(
                f"{self.name} tier: reading entry {stored.spec.key!r} ({nbytes} bytes) failed; it stays stored and "
                f"may be read again: {exc}"
            ) from exc
        except Damaged as exc:
            raise self._corrupt(stored, None, str(exc)) from None
        if self.budget.verify_checksums:
            crcs = list(self._checksums.map(lambda out: crc32c_address(out.data_ptr(), out.numel()),
                                            [out for _, out in wanted]))  # fmt: skip
            for (i, _), crc, trailer in zip(wanted, crcs, trailers, strict=True):
                want = stored.checksums[i]
                if crc != want or (trailer is not None and int.from_bytes(trailer, "little") != want):
                    raise self._corrupt(stored, i, f"CRC32C {crc:#010x}, the manifest says {want:#010x}")
        return outs

    def _corrupt(self, stored: StoredEntry, index: int | None, what: str) -> CorruptEntryError:
        """The error for an entry that does not verify (`index`: the tensor, where one is to blame)."""
        tensor = "" if index is None else f", tensor {stored.spec.tensors[index].name!r}"
        return CorruptEntryError(
            f"{self.name} tier: entry {stored.spec.key!r}{tensor}: {what}; the entry is not served (in "
            f"{self._where}: delete it, or put it again)"
        )

    def delete(self, entry: EntryId) -> None:
        stored = self._stored[entry]
        if self.read_only:
            raise StorageError(f"{self.name} tier: delete({stored.spec.key!r}): this cache opened its stores read-only")
        bucket, pool = self.bucket, self._pool
        name = stored.path.name
        # the versions it replaced, left for readers, go first: with only the newest gone, an older one would be
        # found again as the key's
        older = self._older_versions(stored)
        if older:
            bucket.delete([manifest_path(n) for n in older])
        bucket.delete([manifest_path(name)])  # the entry is gone for everyone from here on
        self._tombstone([*older, name])
        for old_name, old in older.items():
            self._removed[old_name] = time.monotonic()
            self._sizes.pop(old_name, None)
            self._superseded.pop(old_name, None)
            pool.submit(self._remove_quietly, self._objects_of(old))
        self._removed[name] = time.monotonic()  # a listing begun before must not bring it back
        self._drop(entry, name)
        pool.submit(self._remove_quietly, self._objects_of(stored))  # its objects: no caller waits on them

    def supersede(self, entry: EntryId) -> None:
        """Stop serving an entry a newer version of its key replaced; its objects stay (outside the quota) for
        readers elsewhere until a sweep finds the newer one keep_replaced_s old, or a delete of the key takes them."""
        stored = self._stored[entry]
        name = self._unindex(entry)
        self._sizes.pop(name, None)  # on its way out: the quota counts the newer version alone
        self._ignored.add(name)  # not found again while it is listed
        self._superseded[name] = (stored, time.monotonic())

    def _older_versions(self, stored: StoredEntry) -> dict[str, StoredEntry]:
        """The other versions of an entry's key, no newer than it, that this cache left in the store, still indexes
        (one being read, superseded when its read ends) or the last listing found."""
        ours = key_hash(stored.spec.key) + "-"  # a name starts with its key's hash: no other entry is built
        listed = self._parsed  # the lister's, replaced whole on each listing
        candidates = {n: e for n, e in listed.items() if n.startswith(ours) and e is not None}
        candidates |= {n: e for n, (e, _) in self._superseded.items() if n.startswith(ours)}
        candidates |= {n: self._stored[uid] for n, uid in self._ids.items() if n.startswith(ours)}
        return {
            name: other
            for name, other in candidates.items()
            if name != stored.path.name and other.spec.key == stored.spec.key and other.written_ns <= stored.written_ns
        }

    def _tombstone(self, names: Sequence[str]) -> None:
        """In a volatile store, mark entries a cache removed (not lost): other caches then drop their memory copies.
        Swept with the rest once orphan_age_s old."""
        if not self._volatile:
            return
        for name in names:
            try:
                self.bucket.put(f"{ENTRIES}/{name}/{TOMBSTONE}", b"removed")
            except StorageError as exc:  # other caches then keep their copies in memory: logged, not fatal
                log.warning("tiercache: %s", exc)

    def release(self, entry: EntryId) -> None:
        try:
            self.delete(entry)
        except StorageError as exc:  # the lister deletes it again; never served or found again meanwhile
            log.warning("tiercache: %s (the %s tier retries the removal)", exc, self.name)
            if entry in self._stored:
                stored = self._stored[entry]
                versions = [*self._older_versions(stored).values(), stored]  # the newest last, as delete() does
                with self._lock:
                    self._doomed[stored.path.name] = versions
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
        bucket = self.bucket
        paths = [array_path(name, i) for i in range(len(stored.spec.tensors))] if bucket.zarr_arrays else []
        for path, spec in zip(stored.chunk_files, stored.spec.tensors, strict=True):
            paths += bucket.chunk_objects(str(path), spec.nbytes) if spec.nbytes else []
        return paths

    def _remove_quietly(self, paths: list[str]) -> None:
        if paths:
            try:
                self.bucket.delete(paths)
            except StorageError as exc:  # orphans now: the sweep removes them once orphan_age_s old
                log.warning("tiercache: %s", exc)

    # ---- other caches' entries ---------------------------------------------------------------------------------
    def refresh(self) -> Refresh:
        """What the latest listing found (taken on the lister thread: no request here) that this cache lacks, and
        what it no longer lists of what this cache indexed before the listing began."""
        if not self._named.is_set():
            self._named.wait()
        if self._first_error is not None:  # the open fails with it (once)
            error, self._first_error = self._first_error, None
            raise error
        with self._lock:
            listing, self._pending = self._pending, None
            if listing is None:
                return Refresh()
            self._whole = True
            # Entries a read found gone go with the listing the read asked for, so that a newer version it finds
            # replaces them in one refresh; while still listed (a dead holder's keys, a manifest whose chunk is
            # gone) they are not adopted again.
            lost, self._lost = self._lost, set()
            writing = set(self._writing)  # committed perhaps, but the put (outside the cache's lock) indexes them
        self._ignored |= lost
        entries = listing.entries
        found = [
            Found(stored.spec, stored.written_ns, stored)
            for name, stored in entries.items()
            if stored is not None
            and name not in self._ids
            and name not in writing
            and name not in self._ignored
            and self._removed.get(name, -1.0) < listing.started
        ]
        self._removed = {n: t for n, t in self._removed.items() if n in entries or t >= listing.started}
        found.sort(key=lambda f: f.written_ns)
        newer = {f.spec.key for f in found}
        gone = [
            uid
            for name, uid in self._ids.items()
            if (name not in entries and self._since[name] < listing.started) or name in lost
        ]
        # deleted by another cache, not replaced; in a volatile store an entry may also vanish with the memory that
        # held it, which is no delete: only a tombstone says so
        deleted = [
            uid
            for uid in gone
            for stored in [self._stored[uid]]
            if stored.spec.key not in newer
            and stored.path.name not in lost
            and (not self._volatile or stored.path.name in listing.tombstones)
        ]
        for uid in gone:
            self._drop(uid, self._stored[uid].path.name)
        # the quota: each key's newest version (replaced ones are on their way), less what this cache replaced or
        # removed since the listing began (a replacement it committed meanwhile is among its own, unlisted yet)
        since = {n for n, t in self._removed.items() if listing.started <= t < math.inf} | self._superseded.keys()
        sizes = {e.path.name: e.spec.nbytes for e in newest_versions(entries).values() if e.path.name not in since}
        ours = {n: self._sizes[n] for n in (*self._ids, *self._writing) if n not in entries and n in self._sizes}
        self._sizes = sizes | ours
        self._ignored &= set(entries)
        self._superseded = {n: v for n, v in self._superseded.items() if n in entries or v[1] >= listing.started}
        return Refresh(found, gone, deleted)

    def find(self, key: str) -> Refresh:
        """Until the first listing's manifests are taken in: the versions of `key` among the names listed at open,
        their manifests read now (a name starts with its key's hash), outside the cache's lock. A server that fails
        the read is logged and makes the key a miss (a version it could not read may be the newest); the listing
        finds it later."""
        if self._whole:
            return Refresh()
        names = self._unknown(self._versions.get(key_hash(key), ()))
        if not names:
            return Refresh()
        with self.path.unlocked():  # a stalled server holds up no other call of the cache meanwhile
            manifests = self._read_manifests(names)
        if manifests is None or self._whole:  # a refresh meanwhile took in the listing, which has them all
            return Refresh()
        found: list[Found] = []
        for name in self._unknown(names):  # again: another call may have adopted, put or removed one meanwhile
            stored = manifests[name]
            if stored is None or stored.spec.key != key:
                self._unreadable.add(name)  # not read again until the listing
                continue
            found.append(Found(stored.spec, stored.written_ns, stored))
        return Refresh(sorted(found, key=lambda f: f.written_ns))

    def _unknown(self, names: Sequence[str]) -> list[str]:
        """Of entry `names`, those this cache has not indexed, ignored, removed, written or found unreadable."""
        with self._lock:
            skip = self._writing | self._lost | self._removed.keys()
        return [
            n
            for n in names
            if n not in self._ids and n not in skip and n not in self._ignored and n not in self._unreadable
        ]

    def _read_manifests(self, names: list[str]) -> dict[str, StoredEntry | None] | None:
        """The manifests of entry `names` (None: damaged, uncommitted or removed since listed); None where the
        server failed a read (logged)."""
        manifests: dict[str, StoredEntry | None] = {}
        for name in names:  # most keys have one version
            try:
                manifests[name] = self._manifest(name)
            except Missing:
                manifests[name] = None
            except StorageError as exc:
                log.warning("tiercache: %s", exc)
                return None
        return manifests

    def listed(self) -> bool:
        if not self._whole and not self._listed_once.is_set():
            self._wake.set()
        return self._whole

    def wait_listed(self) -> None:
        if self.listed():  # which also wakes a lister that has not listed yet
            return
        with self.path.unlocked():  # the cache's other calls go on meanwhile
            self._listed_once.wait()
        if self._whole:  # another call took the first listing in meanwhile (a later one may have failed since)
            return
        with self._lock:
            failed = self._pending is None and self._list_error
        if failed:
            raise StorageError(
                f"{self.name} tier: the first listing of {self._where} failed ({failed}), so its entries and the "
                f"quota they take are not known yet; the next listing tries again within list_every_s "
                f"({self.budget.list_every_s:g} s)"
            )

    def adopt(self, entry: EntryId, found: Found) -> None:
        stored: StoredEntry = found.handle
        self._specs[entry] = stored.spec  # stored already: its bytes are in the quota's count, whatever the budget
        self._index(entry, stored)

    def ignore(self, found: Found) -> None:
        self._ignored.add(found.handle.path.name)

    def _entry_names(self) -> frozenset[str]:
        """The names of the entry folders under the prefix: one request per 1000 entries, not per 1000 objects."""
        names = {folder.rsplit("/", 1)[-1] for folder in self.bucket.folders(f"{ENTRIES}/")}
        return frozenset(n for n in names if ENTRY_NAME.fullmatch(n))

    def _list(self, *, sweep: bool = True, names: AbstractSet[str] | None = None, started: float = 0.0) -> _Listing:
        """Every live entry under the prefix (every object listed: a folder outlives its manifest, since a removal
        deletes that first and some servers keep empty folders), its manifest read once per name and verified;
        then the sweep, on what the listing found. Given the folders' `names` and when they were listed (a small
        store's first listing, in the open, before this cache indexes anything), no objects are listed."""
        bucket = self.bucket
        objects: list[Listed] = []
        if names is None:
            started = time.monotonic()
            objects = list(bucket.objects(f"{ENTRIES}/"))
            names = {o.path.split("/")[1] for o in objects if o.path.count("/") == 2 and o.path.endswith("/zarr.json")}
        names = {n for n in names if ENTRY_NAME.fullmatch(n)}
        reads = {n: self._manifests.submit(self._manifest, n) for n in sorted(names - self._parsed.keys())}
        entries: dict[str, StoredEntry | None] = {}
        try:
            for name in sorted(names):  # the new manifests read in parallel
                if self._closed:  # a close does not wait for a bucket's worth of manifests
                    return _Listing({}, started)
                try:
                    entries[name] = self._parsed[name] if name in self._parsed else reads[name].result()
                except Missing:  # not committed yet (a put in flight, or a writer that died), or removed since
                    continue
        finally:  # what a failed or closed listing had queued
            for read in reads.values():
                read.cancel()
        self._parsed = entries
        if objects and sweep and not self.read_only:
            self._retry_removals()
            self._sweep(objects, entries)
        tombstones = frozenset(o.path.split("/")[1] for o in objects if o.path.endswith(f"/{TOMBSTONE}"))
        return _Listing(entries, started, tombstones)

    def _retry_removals(self) -> None:
        with self._lock:
            doomed = list(self._doomed.items())
        for name, versions in doomed:
            try:
                for stored in versions:  # the older first, as in delete()
                    self.bucket.delete([manifest_path(stored.path.name), *self._objects_of(stored)])
            except StorageError:
                continue
            self._tombstone([v.path.name for v in versions])
            with self._lock:
                self._doomed.pop(name, None)

    def _manifest(self, name: str) -> StoredEntry | None:
        """The entry `name`'s manifest, verified; None where it is damaged (logged, never served); Missing if gone."""
        bucket = self.bucket
        try:
            return parse_manifest(bytes(bucket.get(manifest_path(name))), Path(ENTRIES, name))
        except DamagedEntry as exc:
            log.warning(
                "tiercache: %s tier: entry %s in %s is damaged, not served: %s", self.name, name, self._where, exc
            )
            return None

    def _sweep(
        self,
        objects: list[Listed],
        entries: dict[str, StoredEntry | None],
        age: float | None = None,
        remove: bool = True,
    ) -> int:
        """Remove, once `age` (orphan_age_s) old, the objects of entries with no manifest (a writer died mid-put)
        or whose manifest is damaged; and, once the newer version's commit is `age` (keep_replaced_s) old, the
        versions of a key that a newer one replaced (manifest first). Never what a put of this cache is writing.
        Returns how many objects went (with `remove` False: would go, and nothing is removed)."""
        now = datetime.now(UTC)
        replaced_age = self.budget.keep_replaced_s if age is None else age  # since the newer version's commit
        age = self.budget.orphan_age_s if age is None else age
        modified = {o.path: o.modified for o in objects}
        with self._lock:
            keep = {n for n, e in entries.items() if e is not None} | self._writing  # damaged entries go too
        orphans = [
            o.path
            for o in objects
            if o.path.count("/") > 1 and o.path.split("/")[1] not in keep and (now - o.modified).total_seconds() >= age
        ]
        newest = newest_versions(entries)
        for stored in (e for e in entries.values() if e is not None):
            best = newest[stored.spec.key]
            committed = modified.get(manifest_path(best.path.name))
            if best is not stored and committed is not None and (now - committed).total_seconds() >= replaced_age:
                if remove:
                    self._remove_quietly([manifest_path(stored.path.name)])
                    self._tombstone([stored.path.name])  # replaced, not lost
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

    def check(self, stored: StoredEntry, batch_bytes: int = CHECK_BATCH) -> str | None:
        """Read every tensor of an entry and check its CRC32C, `batch_bytes` of tensors at a time (check_batches):
        None when it verifies, else what is wrong."""
        bucket = self.bucket
        for indices in check_batches(stored.spec.tensors, batch_bytes):
            try:
                self._fetch(bucket, stored, indices)
            except (CorruptEntryError, EntryNotFoundError) as exc:
                return str(exc)
        return None

    def collect(self, age_s: float, *, dry_run: bool = False) -> int:
        """Sweep now, with every object listed: what no manifest names, entries whose manifest is damaged, and
        replaced versions, once `age_s` old; how many objects went (`dry_run`: would go)."""
        listing = self._list(sweep=False)
        objects = list(self.bucket.objects(f"{ENTRIES}/"))
        live: dict[str, StoredEntry | None] = {n: e for n, e in listing.entries.items() if e is not None}
        return self._sweep(objects, live, age_s, remove=not dry_run)

    def _list_forever(self) -> None:
        try:
            try:
                started = time.monotonic()
                names = self._entry_names()
                for name in names:
                    self._versions.setdefault(name.split("-", 1)[0], []).append(name)
                if len(names) <= self.budget.concurrency:  # one round of parallel reads: in the open, as before
                    self._take_listing(names, started)  # the other tiers open meanwhile
                    self._listed_once.set()
            except BaseException as exc:  # noqa: BLE001 - handed to the first refresh, in the cache's open
                self._first_error = exc
            finally:
                self._named.set()
            while not self._closed:
                # set: wait_listed(), a read found an entry gone, or close(). A larger store's first listing waits
                # for it too: at once, its manifests would take the CPU from the first gets a fresh process opened
                # the store for.
                self._wake.wait(self.budget.list_every_s)
                self._wake.clear()
                if self._closed:
                    break
                self._take_listing()
                self._listed_once.set()
        finally:
            self._listed_once.set()  # wait_listed() never waits on a lister that is gone

    def _take_listing(self, names: AbstractSet[str] | None = None, started: float = 0.0) -> None:
        """Run one listing (`_list`) and hand it to the next refresh; a failure is logged and kept for wait_listed,
        and the next listing tries again."""
        try:
            done = self._list(names=names, started=started)
        except StorageError as exc:  # the server is away
            log.warning("tiercache: %s", exc)
            with self._lock:
                self._list_error = exc
            return
        except Exception as exc:  # noqa: BLE001 - a thread of ours: say it, and go on listing
            log.exception("tiercache: %s tier: listing %s failed", self.name, self._where)
            with self._lock:
                self._list_error = StorageError(f"{self.name} tier: listing {self._where} failed: {exc!r}")
            return
        with self._lock:
            if not self._closed:
                self._pending, self._list_error = done, None

    @property
    def _volatile(self) -> bool:
        return self.bucket.volatile

    @property
    def _where(self) -> str:
        return self.bucket.where

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._lister.join()
        self._pool.shutdown(wait=True)  # removals queued finish (a load's fetches are done by now)
        self._checksums.shutdown(wait=True)
        self._manifests.shutdown(wait=True, cancel_futures=True)
        self.bucket.close()
        self._stored.clear()
        self._ids.clear()
        self._specs.clear()
