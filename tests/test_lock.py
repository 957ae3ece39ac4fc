"""Members of a shared root (tiers/nvme/lock.py, index.py), through TierCache: caches in this process and others
open one root together; a member in another process is listed, a killed one is recovered, one holding the index
past `lock_timeout` is named with its state, no forked child passes for its parent, and an open that fails leaves
no member behind."""

from __future__ import annotations

import errno
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import os_error
from helpers import kv, only_tier

import tiercache
from tiercache import RootInUseError, StorageError
from tiercache.io import FileOps
from tiercache.io.files import StrPath

TESTS = str(Path(__file__).parent)

# A process with a cache open on ROOT (argv[1]), told what to do over stdin: "put KEY" puts an entry;
# "lock" begins a write transaction on the root's index and holds it; "unlock SECONDS" commits it after that long.
HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    sys.path.insert(0, sys.argv[2])
    import tiercache
    from helpers import kv, only_tier
    cache = tiercache.TierCache(root=sys.argv[1], policy=only_tier("nvme"))
    raw = sqlite3.connect(sys.argv[1] + "/index.sqlite3", isolation_level=None)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "put":
            cache.put(words[1], kv(1))
            print("put", flush=True)
        elif words[0] == "lock":
            raw.execute("BEGIN IMMEDIATE")
            print("locked", flush=True)
        elif words[0] == "unlock":
            time.sleep(float(words[1]))
            raw.execute("COMMIT")
            print("unlocked", flush=True)
    """
)


class Holder:
    """A subprocess holding `root` with an open TierCache, talked to over pipes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(root), TESTS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ready = False

    def ready(self) -> Holder:
        """This holder, once it holds its root."""
        if not self._ready:
            self.expect("ready")
            self._ready = True
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.proc.kill()
            assert self.proc.stderr is not None
            stderr = self.proc.stderr.read()
            self.end()
            pytest.fail(f"the holder printed {line!r}, not {word!r}; its stderr:\n{stderr}")

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def state(self) -> str:
        """The process's state letter from /proc (R, S, T, Z, ...)."""
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def wait_for_state(self, wanted: set[str], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state() not in wanted:
            assert time.monotonic() < deadline, f"holder {self.pid} stayed in state {self.state()!r}"
            time.sleep(0.01)

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def holders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Holder]]:
    """The module's holder processes, started together (each spends seconds importing torch): "shared" for the
    tests that neither end nor release it, the others for one test each."""
    base = tmp_path_factory.mktemp("held")
    started = {name: Holder(base / name) for name in ("shared", "killed", "released")}
    yield started
    for holder in started.values():
        holder.end()


@pytest.fixture
def held_root(holders: dict[str, Holder]) -> Holder:
    """A root another process holds for the whole module."""
    return holders["shared"].ready()


@pytest.fixture
def killed_holder(holders: dict[str, Holder]) -> Holder:
    return holders["killed"].ready()


@pytest.fixture
def released_holder(holders: dict[str, Holder]) -> Holder:
    return holders["released"].ready()


def nvme_only() -> tiercache.Policy:
    return only_tier("nvme")


def open_root(root: Path, **kwargs: Any) -> tiercache.TierCache:
    return tiercache.TierCache(root, policy=nvme_only(), **kwargs)


def members(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "members").glob("*.lock"))


def test_caches_in_this_process_share_one_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with open_root(root) as first, open_root(root) as second:
        first.put("a", kv(1))
        assert "a" in second and len(members(root)) == 2
    assert members(root) == []


def test_a_member_in_another_process_is_listed_and_its_entries_seen(held_root: Holder) -> None:
    held_root.tell("put x")
    held_root.expect("put")
    with open_root(held_root.root) as cache:
        assert "x" in cache
        notes = "\n".join(cache.stats().notes)
        assert f"other processes: {held_root.pid}" in notes, notes


def test_a_killed_members_lock_and_row_are_recovered(killed_holder: Holder) -> None:
    killed_holder.proc.send_signal(signal.SIGKILL)
    killed_holder.proc.wait(timeout=30)
    assert len(members(killed_holder.root)) == 1  # its lock file is left behind, held by nobody
    with open_root(killed_holder.root) as cache:
        assert len(members(cache.root)) == 1  # this cache's own: the dead one's was recovered at open
        db = sqlite3.connect(cache.root / "index.sqlite3")
        assert [pid for (pid,) in db.execute("SELECT pid FROM members")] == [os.getpid()]
        db.close()


def test_a_stopped_member_holding_the_index_is_named_as_stopped(held_root: Holder) -> None:
    held_root.tell("lock")
    held_root.expect("locked")
    os.kill(held_root.pid, signal.SIGSTOP)
    try:
        held_root.wait_for_state({"T"})
        start = time.monotonic()
        with pytest.raises(RootInUseError) as caught:
            open_root(held_root.root, lock_timeout=0.3)
        waited = time.monotonic() - start
    finally:
        os.kill(held_root.pid, signal.SIGCONT)
    held_root.tell("unlock 0")
    held_root.expect("unlocked")
    assert f"process {held_root.pid}" in str(caught.value) and "stopped" in str(caught.value)
    assert "lock_timeout" in str(caught.value)
    assert 0.3 <= waited < 5
    assert len(members(held_root.root)) == 1  # the refused open left no member behind


def test_lock_timeout_waits_for_a_transaction_that_ends(released_holder: Holder) -> None:
    released_holder.tell("lock")
    released_holder.expect("locked")
    released_holder.tell("unlock 0.5")
    start = time.monotonic()
    with open_root(released_holder.root, lock_timeout=10) as cache:
        assert len(cache) == 0
    assert time.monotonic() - start >= 0.3
    released_holder.expect("unlocked")


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_is_no_member_and_cannot_use_its_parents_cache(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cache = open_root(root)
    go_r, go_w = os.pipe()
    said_r, said_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: tries the parent's cache once, then waits to be let go
        try:
            os.close(go_w)
            try:
                cache.keys()
                os.write(said_w, b"used")
            except StorageError as exc:
                os.write(said_w, b"refused" if "fork" in str(exc) else b"other")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(said_w)
    try:
        assert os.read(said_r, 16) == b"refused"
        cache.close()
        assert members(root) == []  # the child, still alive, holds nothing of its parent's membership
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        with open_root(root) as again:
            assert len(again) == 0 and len(members(root)) == 1
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.close(said_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class FullAtTheGroupFile(FileOps):
    """A disk with no room for ROOT/entries/zarr.json, the group file the first open writes."""

    def __init__(self) -> None:
        self.refused = 0

    def write_bytes(self, path: StrPath, data: bytes, *, sync: bool = True) -> None:
        if os.fspath(path).endswith(os.path.join("entries", "zarr.json")):
            self.refused += 1
            raise os_error(errno.ENOSPC, "no room for the entries group")
        super().write_bytes(path, data, sync=sync)


def test_an_open_that_fails_leaves_no_member_behind(tmp_path: Path) -> None:
    root = tmp_path / "root"
    full = FullAtTheGroupFile()
    with pytest.raises(StorageError) as caught:
        tiercache.TierCache(root, policy=nvme_only(), files=full)
    assert full.refused == 1
    assert caught.value.errno == errno.ENOSPC
    assert not isinstance(caught.value, RootInUseError)
    assert members(root) == []
    with open_root(root) as cache:  # the real disk, at once
        assert len(cache) == 0
    assert (root / "entries" / "zarr.json").is_file()


@pytest.mark.parametrize("timeout", [-1, "x", math.nan])
def test_a_bad_lock_timeout_is_refused(tmp_path: Path, timeout: Any) -> None:
    with pytest.raises(tiercache.EntryValueError, match="lock_timeout"):
        open_root(tmp_path / "root", lock_timeout=timeout)


# tiercache 0.1's root lock, as it took it: an exclusive record lock on ROOT/.lock with its PID and host written in.
OLD_VERSION = textwrap.dedent(
    """
    import fcntl, os, socket, sys
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("refused", flush=True)
        sys.exit(0)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
    print("holding", flush=True)
    sys.stdin.readline()
    """
)


def old_version(root: Path) -> subprocess.Popen[str]:
    """A process that opens `root` as tiercache 0.1 did; it says "refused" and ends, or "holding" until its stdin
    closes."""
    return subprocess.Popen(
        [sys.executable, "-c", OLD_VERSION, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_an_old_tiercache_is_refused_a_shared_root_and_a_root_it_holds_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = tiercache.TierCache(root=root, policy=only_tier("nvme"))
    second = tiercache.TierCache(root=root, policy=only_tier("nvme"))
    try:
        for _ in range(2):  # while both are open, then while the second one alone is
            old = old_version(root)
            assert old.communicate(timeout=60)[0].strip() == "refused"
            first.close()
    finally:
        second.close()
    old = old_version(root)
    assert old.stdout is not None and old.stdin is not None
    try:
        assert old.stdout.readline().strip() == "holding"
        with pytest.raises(RootInUseError, match=rf"older tiercache \(0\.1\).*process {old.pid}"):
            tiercache.TierCache(root=root, policy=only_tier("nvme"))
        with pytest.raises(RootInUseError, match="older tiercache"):
            tiercache.TierCache(root=root, policy=only_tier("nvme"), read_only=True)
        assert list((root / "members").iterdir()) == []  # a refused open leaves no member behind
    finally:
        old.stdin.close()
        old.wait(timeout=60)
    with tiercache.TierCache(root=root, policy=only_tier("nvme")) as cache:
        cache.put("k", kv(1))
