"""Every injection point of every disk operation: the system call N of open, get, put, replacement, write-through,
demotion and delete fails with EIO, for every N the operation makes, and each time the outcome is one of two:
it succeeded (and the new state holds, now and after a reopen), or it raised the entry's StorageError with errno
kept (and the state is exactly as before, now and after a reopen). Accounting always equals the bytes on disk."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import FaultAt
from helpers import KiB, MiB, assert_same, disk_bytes, kv, only_tier, policy

import tiercache
from tiercache import StorageError
from tiercache.io import FileOps

NVME = only_tier("nvme", 4 * MiB)
TIERED = policy(
    tiers={"hbm": {"capacity": 0}, "host": {"capacity": 160 * KiB}, "nvme": {"capacity": 4 * MiB}},
    eviction={"nvme_admit_after": 1},
)


@dataclass
class Case:
    policy: tiercache.Policy
    setup: dict[str, int]  # key -> kv seed, stored (write-through) before the operation
    action: Callable[[tiercache.TierCache], object]
    before: dict[str, int]  # what the cache holds if the action raised
    after: dict[str, int]  # ... and if it returned
    key: str  # the key the error must name
    persists: bool = True  # whether `after` is also what a reopen finds (entries that reached nvme)
    # Whether some fault can make it raise. A delete commits in the root's index (SQLite, whose I/O is not the
    # FileOps calls faulted here); a disk refusing the files' removal after that leaves them, counted, to a sweep.
    can_fail: bool = True


def _demote(cache: tiercache.TierCache) -> None:
    cache.put("h3", kv(13))  # the host tier holds two: h1 goes down to nvme


CASES = {
    "get": Case(NVME, {"a": 1}, lambda c: assert_same(c.get("a"), kv(1)), {"a": 1}, {"a": 1}, "a"),
    "put": Case(NVME, {"a": 1}, lambda c: c.put("b", kv(2)), {"a": 1}, {"a": 1, "b": 2}, "b"),
    "replace": Case(NVME, {"a": 1}, lambda c: c.put("a", kv(2)), {"a": 1}, {"a": 2}, "a"),
    "write_through": Case(
        TIERED, {"a": 1}, lambda c: c.put("b", kv(2), write_through=True), {"a": 1}, {"a": 1, "b": 2}, "b"
    ),
    "delete": Case(NVME, {"a": 1, "b": 2}, lambda c: c.delete("a"), {"a": 1, "b": 2}, {"b": 2}, "a", can_fail=False),
    "demote": Case(TIERED, {}, _demote, {"h1": 11, "h2": 12}, {"h1": 11, "h2": 12, "h3": 13}, "h1", persists=False),
}


def _prepare(template: Path, case: Case) -> None:
    with tiercache.TierCache(root=template, policy=case.policy) as cache:
        for key, seed in case.setup.items():
            cache.put(key, kv(seed), write_through=True)


def _holds(cache: tiercache.TierCache, expected: dict[str, int]) -> None:
    assert sorted(cache.keys()) == sorted(expected)
    for key, seed in expected.items():
        assert_same(cache.get(key, device="cpu"), kv(seed))
    assert cache.stats().tiers["nvme"].used == disk_bytes(cache.root)


def _trial(template: Path, root: Path, case: Case, nth: int | None, code: int = errno.EIO) -> tuple[int, bool]:
    """Run the case with call `nth` failing with `code`; returns (calls made, whether it raised)."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root, ignore=shutil.ignore_patterns("*.lock"))
    disk = FaultAt(code)
    cache = tiercache.TierCache(root=root, policy=case.policy, files=disk)
    try:
        if case.action is _demote:
            cache.put("h1", kv(11))
            cache.put("h2", kv(12))
        disk.arm(nth)
        try:
            case.action(cache)
            raised = False
        except StorageError as exc:
            assert nth is not None, exc
            assert exc.errno == code, (disk.failed, exc)
            assert repr(case.key) in str(exc), (disk.failed, exc)
            raised = True
        calls = disk.calls
        disk.arm(None)
        _holds(cache, case.before if raised else case.after)
    finally:
        cache.close()
    with tiercache.TierCache(root=root, policy=case.policy) as reopened:
        expected = case.before if raised else case.after
        if case.persists:
            _holds(reopened, expected)
        assert not list((root / "tmp").iterdir()) and not list((root / "trash").iterdir())
    return calls, raised


@pytest.mark.parametrize(
    ("name", "code"), [(name, errno.EIO) for name in CASES] + [("replace", errno.ENOSPC), ("demote", errno.ENOSPC)]
)
def test_every_injection_point_fails_cleanly_or_succeeds(tmp_path: Path, name: str, code: int) -> None:
    case = CASES[name]
    template = tmp_path / "template"
    _prepare(template, case)
    calls, _ = _trial(template, tmp_path / "root", case, None)
    assert calls > 0
    outcomes = [_trial(template, tmp_path / "root", case, nth, code)[1] for nth in range(calls)]
    assert any(outcomes) == case.can_fail, f"{name}: {sum(outcomes)} of {calls} injected faults made it fail"


def test_every_injection_point_of_open_fails_cleanly_and_releases_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _prepare(root, Case(NVME, {"a": 1, "b": 2}, lambda c: None, {}, {}, ""))
    counting = FaultAt()
    counting.arm(None)
    tiercache.TierCache(root=root, policy=NVME, files=counting).close()
    failed = 0
    for nth in range(counting.calls):
        disk = FaultAt(errno.EIO)
        disk.arm(nth)
        try:
            cache = tiercache.TierCache(root=root, policy=NVME, files=disk)
        except StorageError as exc:
            assert exc.errno == errno.EIO, (disk.failed, exc)
            assert str(root) in str(exc), exc
            failed += 1
        else:
            assert set(cache.keys()) <= {"a", "b"}  # an entry whose stat failed is skipped, left on disk
            cache.close()
        with tiercache.TierCache(root=root, policy=NVME, files=FileOps()) as cache:  # never left locked
            _holds(cache, {"a": 1, "b": 2})
    assert failed > 0


if __name__ == "__main__":  # the figures in docs/reliability.md: python tests/test_fault_sweep.py (from the repo root)
    import tempfile

    scratch = Path(tempfile.mkdtemp())
    for name, case in CASES.items():
        for code in (errno.EIO, errno.ENOSPC):
            template = scratch / f"{name}-{code}"
            _prepare(template, case)
            points, _ = _trial(template, scratch / "root", case, None)
            raised = sum(_trial(template, scratch / "root", case, nth, code)[1] for nth in range(points))
            returned = points - raised
            print(f"{name:14} {errno.errorcode[code]:7} {points:4} points {raised:4} raised {returned:4} returned")
    shutil.rmtree(scratch)
