"""The nvme root's lock (tiers/nvme/lock.py), through TierCache: one open cache per root, in this process or another;
a dead holder's lock is taken over, a stopped one is named as such, lock_timeout waits, no forked child keeps it,
and an open that fails lets go of it."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CacheFactory
from faults import os_error
from helpers import only_tier

import tiercache
from tiercache import RootInUseError, StorageError
from tiercache.io import FileOps
from tiercache.io.files import StrPath

TESTS = str(Path(__file__).parent)

# A process that holds ROOT (argv[1]) until told: "release SECONDS" closes its cache after that long, then it
# prints "closed" and goes on reading stdin until EOF.
HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import tiercache
    from helpers import only_tier
    cache = tiercache.TierCache(root=sys.argv[1], policy=only_tier("nvme"))
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words and words[0] == "release":
            time.sleep(float(words[1]))
            cache.close()
            print("closed", flush=True)
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


def test_a_second_cache_in_this_process_is_refused_until_the_first_closes(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first = make_cache(nvme_only(), root)
    with pytest.raises(RootInUseError, match="this process"):
        open_root(root)
    first.close()
    again = make_cache(nvme_only(), root)
    assert len(again) == 0


def test_a_root_held_by_another_process_names_its_pid(held_root: Holder) -> None:
    with pytest.raises(RootInUseError) as caught:
        open_root(held_root.root)
    assert f"process {held_root.pid}" in str(caught.value)
    assert "running" in str(caught.value)
    assert isinstance(caught.value, StorageError)


def test_a_dead_holders_lock_is_taken_over(killed_holder: Holder) -> None:
    with pytest.raises(RootInUseError, match=f"process {killed_holder.pid}"):
        open_root(killed_holder.root)
    killed_holder.proc.kill()
    killed_holder.proc.wait(timeout=30)
    with open_root(killed_holder.root) as cache:
        assert len(cache) == 0


def test_a_stopped_holder_is_named_as_stopped(held_root: Holder) -> None:
    os.kill(held_root.pid, signal.SIGSTOP)
    try:
        held_root.wait_for_state({"T"})
        with pytest.raises(RootInUseError) as caught:
            open_root(held_root.root)
        assert f"process {held_root.pid}" in str(caught.value)
        assert "stopped" in str(caught.value)
    finally:
        os.kill(held_root.pid, signal.SIGCONT)
    held_root.wait_for_state({"R", "S"})


def test_lock_timeout_waits_for_a_holder_that_releases(released_holder: Holder) -> None:
    with pytest.raises(RootInUseError):  # held now: without waiting, refused
        open_root(released_holder.root)
    released_holder.tell("release 0.5")  # the holder closes its cache 0.5 s from now
    started = time.monotonic()
    with open_root(released_holder.root, lock_timeout=10) as cache:
        waited = time.monotonic() - started
        assert len(cache) == 0
    released_holder.expect("closed")
    assert 0.4 <= waited < 10  # it could only open once the holder closed, 0.5 s after being told


def test_lock_timeout_gives_up_on_a_holder_that_never_releases(held_root: Holder) -> None:
    started = time.monotonic()
    with pytest.raises(RootInUseError) as caught:
        open_root(held_root.root, lock_timeout=0.3)
    waited = time.monotonic() - started
    assert "after waiting 0.3 s" in str(caught.value)
    assert f"process {held_root.pid}" in str(caught.value)
    assert 0.3 <= waited < 5


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_does_not_keep_a_closed_root_locked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cache = open_root(root)
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never touches the cache, waits to be let go
        try:
            os.close(go_w)
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(go_r)
    try:
        cache.close()
        with open_root(root) as again:
            assert len(again) == 0
            assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # the child is still alive, holding what it inherited
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
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


def test_an_open_that_fails_releases_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "root"
    full = FullAtTheGroupFile()
    with pytest.raises(StorageError) as caught:
        tiercache.TierCache(root, policy=nvme_only(), files=full)
    assert full.refused == 1
    assert caught.value.errno == errno.ENOSPC
    assert not isinstance(caught.value, RootInUseError)
    with open_root(root) as cache:  # the real disk, at once: the failed open let go of the root
        assert len(cache) == 0
    assert (root / "entries" / "zarr.json").is_file()


@pytest.mark.parametrize("timeout", [-1, "x", math.nan])
def test_a_bad_lock_timeout_is_refused(tmp_path: Path, timeout: Any) -> None:
    with pytest.raises(tiercache.EntryValueError, match="lock_timeout"):
        open_root(tmp_path / "root", lock_timeout=timeout)
