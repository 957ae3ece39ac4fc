"""The remote tier's store: a thin wrapper over a Mooncake Store client (`mooncake.store`, the `mooncake` extra)
for the master a policy's `[tiers.remote]` names, with every failure turned into the cache's errors.

How Mooncake is used, and why:
- This client lends no memory to the store (a global segment of 0 bytes): the `mooncake_client` holders do, so an
  entry outlives the process that put it, which is what a handoff between stages or nodes needs.
- A chunk is one store object per `part_size` bytes (`PATH@0`, `PATH@1`, ...). An entry's parts go in batches of
  `concurrency`, each one `batch_put_from` from the tensors' own memory or one `batch_get_into` straight into the
  destination buffers: no copy through Mooncake's local buffer (over TCP, any memory will do; RDMA registers it
  for the transfer). The master leases a batch's keys together, so a batch must arrive within the lease; parts
  whose lease ran out are read once more. The CRC32C stays in the manifest (no trailer object).
- Every object is hard-pinned: what the tier accounts as held is never evicted by the store.
- A removal is forced: an object under a read lease (any get holds one for the lease's length) would refuse it. A
  reader on another node that is still reading such an object reads freed memory at worst, and the tier's
  checksum refuses that (a CorruptEntryError, never wrong data; so the remote tier always verifies).
- Mooncake's calls take no timeout, so each runs on a daemon thread of its own and the caller waits at most
  `timeout_s`. A call that times out keeps the memory it was given alive until it returns, and what it wrote once
  it lands late is removed. `setup` and `close` hold the GIL (setup waits without end for an absent master), so
  the master is probed first (its RPC port must answer a coro_rpc request), and one client per master serves the
  process and is never closed.
- The master's HTTP admin server's `/get_all_keys` is the listing; it says nothing of when a key was written, so
  `Listed.modified` is when this cache first listed it.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any, TypeVar

import torch

from ...errors import StorageError
from ...policy.schema import RemoteBudget
from ..object.store import Damaged, Listed, Missing, Store

T = TypeVar("T")
log = logging.getLogger("tiercache")

# Mooncake's ErrorCode values (mooncake-store/include/types.h) that the tier tells apart.
NO_AVAILABLE_HANDLE = -200  # no room: every holder's segment is full (of pinned objects)
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
LEASE_EXPIRED = -707
REPLICA_NOT_FOUND = -710
REPLICA_IS_GONE = -712
TRANSFER_FAIL = -800  # the holder did not answer (it died, or its node is away)
RPC_FAIL = -900  # the master did not answer
GONE = {OBJECT_NOT_FOUND, REPLICA_NOT_FOUND, REPLICA_IS_GONE, TRANSFER_FAIL}  # a miss: evicted, lost or removed
NAMES = {
    NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE",
    INVALID_PARAMS: "INVALID_PARAMS",
    OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND",
    LEASE_EXPIRED: "LEASE_EXPIRED",
    REPLICA_IS_GONE: "REPLICA_IS_GONE",
    TRANSFER_FAIL: "TRANSFER_FAIL",
    RPC_FAIL: "RPC_FAIL",
}
MANIFEST_BUFFER = 16 << 20  # Mooncake's local buffer, which small objects (manifests) are copied through
# One client per master and configuration in this process (MooncakeStore._client); transfers registered with each
# (RDMA only), by (address, bytes), with how many transfers use the registration.
_CLIENTS: dict[tuple[str, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_REGISTERED: dict[int, dict[tuple[int, int], int]] = {}


def _mooncake() -> Any:
    """The `mooncake.store` module, imported on first use: it loads a large C++ library, and a cache without a
    remote tier should not pay for it."""
    import mooncake.store  # noqa: PLC0415

    return mooncake.store


def install_hint() -> str | None:
    """What to install for the remote tier on this machine, or None where Mooncake imports."""
    try:
        _mooncake()
    except ImportError as exc:
        if "libibverbs" in str(exc):
            return f"it needs the Debian library libibverbs1, even for TCP: apt-get install libibverbs1 ({exc})"
        return f"pip install 'tiercache-gpu[mooncake]' ({exc})"
    return None


class MooncakeStore(Store):
    """The objects under `PREFIX/` in the Mooncake Store one master runs."""

    zarr_arrays = False  # nobody reads it with zarr: the manifest is the whole of an entry's metadata
    volatile = True  # what a holder held dies with it; a master restart forgets everything

    def __init__(self, budget: RemoteBudget) -> None:
        hint = install_hint()
        if hint is not None:
            raise StorageError(f"remote tier: the Mooncake client does not import: {hint}; or remove [tiers.remote]")
        self.budget = budget
        self.where = f"the Mooncake Store of master {budget.master} (keys {budget.prefix}/...)"
        self._prefix = budget.prefix.strip("/") + "/"
        self._lock = threading.Lock()
        self._seen: dict[str, datetime] = {}  # key -> when this cache first listed it
        self._closed = False
        self._probe()
        mooncake = _mooncake()
        self.store = self._client(mooncake)
        self.config = mooncake.ReplicateConfig()
        self.config.replica_num = 1
        self.config.with_hard_pin = True  # what the tier counts as held is never evicted by the store
        if budget.preferred_segment:
            self.config.preferred_segment = budget.preferred_segment

    def _client(self, mooncake: Any) -> Any:
        """This process's client of the master: one for every cache that names it, set up once and never closed.
        Mooncake's close holds the GIL for about a second, and closing a client under a call that timed out and
        still runs crashed the process; the client goes with the process."""
        budget = self.budget
        config = (budget.master, budget.metadata_url, budget.local_hostname, budget.protocol, budget.device_names)
        with _CLIENTS_LOCK:
            if config in _CLIENTS:
                return _CLIENTS[config]
            client = mooncake.MooncakeDistributedStore()
            rc = self._call(
                "connecting",
                client.setup,
                budget.local_hostname,
                budget.metadata_url,
                0,  # global segment: this client lends no memory (the holders do)
                MANIFEST_BUFFER,
                budget.protocol,
                budget.device_names,
                budget.master,
            )
            if rc != 0:
                raise StorageError(
                    f"remote tier ({self.where}): connecting failed (code {rc}); check that mooncake_master answers "
                    f"at {budget.master} and its metadata server at {budget.metadata_url} (tiers.remote.master, "
                    "metadata_server), and that tiers.remote.local_hostname is an address of this node"
                )
            _CLIENTS[config] = client
            return client

    def _probe(self) -> None:
        """Ask the master's RPC port and admin server before setup: Mooncake's setup holds the GIL and waits without
        end for a master that is not there, or for one that is not a master (the metadata server's port given as
        the master's, a listener that never answers), so no thread of ours could time it out."""
        host, port = self.budget.master_host, int(self.budget.master.rsplit(":", 1)[1])
        admin = f"{self.budget.admin_url}/get_all_segments"
        try:
            answered = _rpc_answers(host, port, self.budget.timeout_s)
            if answered:  # else no second request (and timeout) for a master that is not one
                urllib.request.urlopen(admin, timeout=self.budget.timeout_s).close()
        except OSError as exc:
            raise StorageError(
                f"remote tier ({self.where}): the master does not answer ({exc}); check that mooncake_master runs at "
                f"{self.budget.master} with its admin server at {self.budget.admin_url} (tiers.remote.master, admin)"
            ) from None
        if not answered:
            raise StorageError(
                f"remote tier ({self.where}): {self.budget.master} accepts connections but does not answer as a "
                "mooncake_master's RPC port; check that tiers.remote.master is the master's -rpc_port (50051 unless "
                "set), not its metadata or admin server's port"
            )

    # ---- calls, each under the timeout ---------------------------------------------------------------------
    def _call(
        self,
        doing: str,
        fn: Callable[..., T],
        *args: Any,
        hold: Sequence[object] = (),
        release: Callable[[], object] = lambda: None,
        undo: Callable[[T], object] | None = None,
    ) -> T:
        """`fn(*args)` on a daemon thread of its own (one Mooncake never answers must not hold up the interpreter's
        exit), waited for at most `timeout_s`. What the call reads or writes (`hold`: tensors whose addresses it
        was given) stays alive, and `release` (unregistering them) waits, until it has returned, even after a
        timeout; `undo` then takes back what a call that timed out did after all (a put that landed late)."""
        if self._closed:
            raise StorageError(f"remote tier ({self.where}): {doing}: the store was closed")
        future: Future[T] = Future()
        timed_out = threading.Event()

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
            else:
                future.set_result(result)
                if undo is not None and timed_out.is_set():
                    undo(result)
            finally:
                release()
                del hold_alive[:]

        hold_alive = list(hold)
        threading.Thread(target=run, name="tiercache-mooncake", daemon=True).start()
        try:
            return future.result(timeout=self.budget.timeout_s)
        except FutureTimeout:
            timed_out.set()
            if future.done() and undo is not None and future.exception() is None:
                undo(future.result())  # it answered between the timeout and the flag
            raise StorageError(
                f"remote tier ({self.where}): {doing} did not answer within tiers.remote.timeout_s "
                f"({self.budget.timeout_s:g} s); check that mooncake_master and the holders (mooncake_client) run"
            ) from None

    def _key(self, path: str) -> str:
        return self._prefix + path

    def _fail(self, doing: str, rc: int) -> StorageError:
        name = NAMES.get(rc, "")
        if rc == NO_AVAILABLE_HANDLE:
            fix = (
                "the holders' memory is full of pinned objects: lower tiers.remote.capacity below what the holders "
                "lend (mooncake_client -global_segment_size, summed), or start more holders"
            )
        elif rc == LEASE_EXPIRED:
            fix = (
                f"a batch of parts took longer to read than the master's lease (tiers.remote.lease_s = "
                f"{self.budget.lease_s:g}): lower tiers.remote.part_size or concurrency (a batch is concurrency parts),"
                " or start mooncake_master with a longer -default_kv_lease_ttl"
            )
        elif rc == RPC_FAIL:
            fix = f"the master at {self.budget.master} did not answer; check that mooncake_master runs there"
        else:
            fix = "check that mooncake_master and the holders (mooncake_client) run, and their logs"
        return StorageError(f"remote tier ({self.where}): {doing} failed with code {rc} {name}".rstrip() + f"; {fix}")

    def _register(self, tensors: Sequence[torch.Tensor]) -> Callable[[], None]:
        """Register the tensors' memory for a transfer; the call that undoes it. Over TCP there is nothing to do: the
        transfer engine reads and writes any memory (registering is slower, and refuses a region that overlaps one
        registered already); RDMA needs each region registered while a transfer uses it."""
        if self.budget.protocol != "rdma":
            return lambda: None
        regions = [_Registered(self, t.data_ptr(), t.numel()) for t in tensors if t.numel()]
        done: list[_Registered] = []
        try:
            for region in regions:
                region.__enter__()
                done.append(region)
        except BaseException:
            for region in done:
                region.__exit__()
            raise

        def release() -> None:
            for region in done:
                region.__exit__()

        return release

    # ---- small objects -------------------------------------------------------------------------------------
    def put(self, path: str, data: bytes, *, create: bool = False) -> None:
        # Names are fresh per version, so create-if-absent needs no check: Mooncake keeps the first value of a key
        # (a second put of it answers 0 and changes nothing), which is what a retried commit wants. A put that
        # times out and lands later is removed (a manifest committed after its put gave up would name parts gone).
        key = self._key(path)
        rc = self._call(f"writing {path}", self.store.put, key, data, self.config,
                        undo=lambda rc: rc == 0 and self.store.remove(key, True))  # fmt: skip
        if rc != 0:
            raise self._fail(f"writing {path}", rc)

    def get(self, path: str) -> bytes:
        data = self._call(f"reading {path}", self.store.get, self._key(path))
        if data:
            return data
        # b"" is both a miss and a failure: ask which
        rc = self._call(f"looking up {path}", self.store.is_exist, self._key(path))
        if rc in (0, 1):  # absent, or there but unreadable (its holder is gone): a miss either way
            raise Missing(path)
        raise self._fail(f"reading {path}", rc)

    # ---- chunks --------------------------------------------------------------------------------------------
    def _parts(self, path: str, nbytes: int) -> list[tuple[str, int, int]]:
        """(key, offset, size) of each part of an `nbytes` chunk at `path`."""
        size = self.budget.part_size
        return [(f"{self._key(path)}@{j}", at, min(size, nbytes - at)) for j, at in enumerate(range(0, nbytes, size))]

    def chunk_objects(self, path: str, nbytes: int) -> list[str]:
        return [key[len(self._prefix) :] for key, _, _ in self._parts(path, nbytes)]

    def _batches(self, parts: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
        """Parts in batches of `concurrency` (each part at most `part_size`): each batch is one call, under its own
        timeout and (for reads) the master's lease, which it asks for all of a batch's keys at once."""
        step = self.budget.concurrency
        return [parts[i : i + step] for i in range(0, len(parts), step)]

    def put_chunks(self, chunks: Sequence[tuple[str, torch.Tensor, bytes]], written: list[str]) -> None:
        # straight from the tensors' memory, a batch of parts per call
        if not chunks:
            return
        parts = [(key, data.data_ptr() + at, n) for path, data, _ in chunks
                 for key, at, n in self._parts(path, data.numel())]  # fmt: skip
        written += [key[len(self._prefix) :] for key, _, _ in parts]  # for the cleanup, should a call fail
        tensors = [data for _, data, _ in chunks]
        for batch in self._batches(parts):
            keys = [k for k, _, _ in batch]
            release = self._register(tensors)
            codes = self._call(
                f"writing {keys[0]} and {len(keys) - 1} more parts" if len(keys) > 1 else f"writing {keys[0]}",
                self.store.batch_put_from, keys, [a for _, a, _ in batch], [n for _, _, n in batch], self.config,
                hold=tensors, release=release, undo=functools.partial(self._take_back, keys),
            )  # fmt: skip
            if len(codes) != len(batch):
                raise StorageError(f"remote tier ({self.where}): writing {keys[0]}: {len(codes)} answers for "
                                   f"{len(batch)} parts")  # fmt: skip
            failed = [(key, rc) for key, rc in zip(keys, codes, strict=True) if rc != 0]
            if failed:
                raise self._fail(f"writing {failed[0][0]} ({len(failed)} of {len(batch)} parts)", failed[0][1])

    def _take_back(self, keys: list[str], _codes: object) -> None:
        """Remove what a batch put that timed out wrote when it landed after all (its entry never committed)."""
        self.store.batch_remove(keys, True)

    def read_chunks(self, chunks: Sequence[tuple[str, torch.Tensor]]) -> list[bytes | None]:
        # straight into the destination buffers, a batch of parts per call
        parts = [(key, out.data_ptr() + at, n) for path, out in chunks for key, at, n in self._parts(path, out.numel())]
        outs = [out for _, out in chunks]
        for batch in self._batches(parts):
            todo = batch
            for _ in range(2):
                keys = [k for k, _, _ in todo]
                doing = f"reading {keys[0]}" + (f" and {len(keys) - 1} more parts" if len(keys) > 1 else "")
                codes = self._call(
                    doing, self.store.batch_get_into, keys, [a for _, a, _ in todo], [n for _, _, n in todo],
                    hold=outs, release=self._register(outs),
                )  # fmt: skip
                if len(codes) != len(todo):
                    raise StorageError(f"remote tier ({self.where}): {doing}: {len(codes)} answers")
                for (key, _, _), rc in zip(todo, codes, strict=True):
                    if rc == TRANSFER_FAIL:
                        log.warning(
                            "tiercache: remote tier: the holder of %s did not answer (a miss): if it runs, check that "
                            "this node reaches its transfer engine's ports and that tiers.remote.local_hostname is "
                            "this node's address", key,
                        )  # fmt: skip
                    if rc in GONE:
                        raise Missing(f"{key} is gone ({NAMES.get(rc, rc)})")
                wrong = [(p, rc) for p, rc in zip(todo, codes, strict=True) if rc != p[2] and rc != LEASE_EXPIRED]
                if wrong:
                    (key, _, size), rc = wrong[0]
                    if rc >= 0:  # names are never reused, so this is not the object the manifest names
                        raise Damaged(f"{key} holds {rc} bytes, not {size}")
                    raise self._fail(doing, rc)
                todo = [p for p, rc in zip(todo, codes, strict=True) if rc == LEASE_EXPIRED]
                if not todo:
                    break
            else:
                raise self._fail(f"reading {todo[0][0]} ({len(todo)} parts, twice)", LEASE_EXPIRED)
        return [None] * len(chunks)  # the checksums are in the manifest only

    # ---- removal and listing -------------------------------------------------------------------------------
    def delete(self, paths: Sequence[str]) -> None:
        paths = list(dict.fromkeys(paths))  # Mooncake answers a repeated key once
        if not paths:
            return
        codes = self._call(f"removing {paths[0]}", self.store.batch_remove, [self._key(p) for p in paths], True)
        if len(codes) != len(paths):
            raise StorageError(
                f"remote tier ({self.where}): removing {len(paths)} objects (from {paths[0]}) got {len(codes)} "
                "answers; the sweep removes what is left"
            )
        failed = [(p, rc) for p, rc in zip(paths, codes, strict=True) if rc not in (0, OBJECT_NOT_FOUND)]
        if failed:
            raise self._fail(f"removing {failed[0][0]}{' ...' if len(failed) > 1 else ''}", failed[0][1])

    def objects(self, prefix: str) -> Iterator[Listed]:
        url = f"{self.budget.admin_url}/get_all_keys"
        try:
            with urllib.request.urlopen(url, timeout=self.budget.timeout_s) as reply:
                body = reply.read().decode()
        except (OSError, urllib.error.URLError) as exc:
            raise StorageError(
                f"remote tier ({self.where}): listing the keys at {url} failed: {exc}; check tiers.remote.admin "
                "(the master's -metrics_host and -metrics_port)"
            ) from None
        start, now = self._key(prefix), datetime.now(UTC)
        keys = [k[len(self._prefix) :] for k in body.split("\n") if k.startswith(start)]
        with self._lock:
            self._seen = {k: self._seen.get(k, now) for k in keys}
            seen = dict(self._seen)
        for key in keys:
            yield Listed(key, 0, seen[key])

    def folders(self, prefix: str) -> list[str]:
        return sorted({prefix + o.path[len(prefix) :].split("/", 1)[0] for o in self.objects(prefix)})

    def close(self) -> None:
        """Refuse further calls; the client stays for the process's other caches (see `_client`)."""
        self._closed = True


# A coro_rpc request header (Mooncake's RPC, yalantinglibs' coro_rpc protocol): magic 21, version 0, serialisation
# 0, message type 0, a sequence number, function id, body and attachment lengths. Function 0 is no function: a
# master answers at once with an error response that starts with the magic and echoes the sequence number.
_RPC_MAGIC = 21
_RPC_SEQ = 0x7C3A


def _rpc_answers(host: str, port: int, timeout: float) -> bool:
    """Whether a coro_rpc server answers at host:port within `timeout` in all (OSError: nothing accepts
    connections there)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        head = b""
        try:
            sock.sendall(struct.pack("<4B4I", _RPC_MAGIC, 0, 0, 0, _RPC_SEQ, 0, 0, 0))
            while len(head) < 8:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                piece = sock.recv(8 - len(head))
                if not piece:
                    return False  # closed on us: not a coro_rpc server
                head += piece
        except (TimeoutError, ConnectionResetError):
            return False  # something that never answers, or refuses the request
    magic, _version, _error, _kind, seq = struct.unpack("<4BI", head)
    return magic == _RPC_MAGIC and seq == _RPC_SEQ


class _Registered:
    """A tensor's memory registered with the transfer engine for one transfer (shared by transfers that overlap)."""

    def __init__(self, store: MooncakeStore, address: int, nbytes: int) -> None:
        self.store, self.region = store, (address, nbytes)

    def __enter__(self) -> None:
        with _CLIENTS_LOCK:
            registered = _REGISTERED.setdefault(id(self.store.store), {})
            count = registered.get(self.region, 0)
            if count == 0:
                rc = self.store.store.register_buffer(*self.region)
                if rc != 0:
                    raise self.store._fail(f"registering {self.region[1]} bytes of memory", rc)
            registered[self.region] = count + 1

    def __exit__(self, *exc: object) -> None:
        with _CLIENTS_LOCK:
            registered = _REGISTERED[id(self.store.store)]
            count = registered.pop(self.region) - 1
            if count:
                registered[self.region] = count
            else:
                self.store.store.unregister_buffer(self.region[0])
