"""The hypothesis state machine with two processes on one root: this process's cache and another process's put,
get and delete entries against one model, and after every step both list exactly the model's keys, every get
returns the model's version, and both count the same shared nvme bytes. The other process's cache is also closed
and reopened (a new member) and SIGKILL-free restarts keep the root consistent."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import KiB, policy
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from shared_worker import check, serve, stamp

import tiercache

KEYS = st.sampled_from(["a", "b", "c", "tenant/d"])
# Both caches nvme-only: the memory tiers are per process, so the shared state is exactly what the index holds.
SHARED = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 0}, "nvme": {"capacity": 4096 * KiB}})


class Other:
    """The cache in the other process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited cache or lock
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()

    def __call__(self, *request: Any) -> Any:
        self.conn.send(request)
        reply = self.conn.recv()
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise AssertionError(f"the other process failed {request}: {reply[1]}")
        return reply

    def stop(self) -> None:
        self("exit")
        self.proc.join(30)


OTHER: Other | None = None


@pytest.fixture(scope="module", autouse=True)
def other_process() -> Iterator[None]:
    global OTHER
    OTHER = Other()
    yield
    OTHER.stop()
    OTHER = None


class TwoProcessesOneRoot(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert OTHER is not None
        self.other = OTHER
        self.dir = Path(tempfile.mkdtemp(prefix="tc-sm2-"))
        self.mine = tiercache.TierCache(root=self.dir, policy=SHARED, device="cpu")
        self.other("open", str(self.dir), SHARED)
        self.model: dict[str, int] = {}
        self.version = 0

    def teardown(self) -> None:
        self.other("close")
        self.mine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _next(self) -> int:
        self.version += 1
        return self.version

    @rule(key=KEYS)
    def put_here(self, key: str) -> None:
        version = self._next()
        self.mine.put(key, stamp(key, version, 512))
        self.model[key] = version

    @rule(key=KEYS)
    def put_there(self, key: str) -> None:
        version = self._next()
        self.other("put", key, version)
        self.model[key] = version

    @rule(key=KEYS)
    def get_here(self, key: str) -> None:
        got = self.mine.get(key, device="cpu")
        assert (None if got is None else check(key, got)) == self.model.get(key)

    @rule(key=KEYS)
    def get_there(self, key: str) -> None:
        assert self.other("get", key) == self.model.get(key)

    @rule(key=KEYS, here=st.booleans())
    def delete(self, key: str, here: bool) -> None:
        if here:
            try:
                self.mine.delete(key)
                deleted = True
            except KeyError:
                deleted = False
        else:
            deleted = self.other("delete", key)
        assert deleted == (key in self.model)
        self.model.pop(key, None)

    @rule()
    def reopen_there(self) -> None:
        self.other("close")
        self.other("open", str(self.dir), SHARED)

    @invariant()
    def both_see_the_model(self) -> None:
        assert sorted(self.mine.keys()) == sorted(self.model)
        assert self.other("keys") == sorted(self.model)
        mine = self.mine.stats().tiers["nvme"].used
        assert mine == self.other("used") == 512 * 8 * 2 * len(self.model) + 16 * len(self.model)


TwoProcessesOneRoot.TestCase.settings = settings(
    max_examples=15, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_two_processes_on_one_root = TwoProcessesOneRoot.TestCase
