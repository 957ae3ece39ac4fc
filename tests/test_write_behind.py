"""placement.write = "behind": a background queue writes each put down to nvme soon after, keeping the memory copy,
and gives way while reads run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from helpers import assert_same, kv, policy

import tiercache
from tiercache.io import FileOps

BEHIND = policy(placement={"write": "behind"})


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_puts_reach_nvme_in_the_background_and_keep_their_memory_copy(make_cache: Any) -> None:
    cache = make_cache(BEHIND)
    assert cache.put("a", kv(1)) == "hbm"
    assert wait_for(lambda: cache.info("a").tiers == ("hbm", "nvme"))
    assert_same(cache["a"], kv(1))
    cache.delete("a")
    cache.put("b", kv(2))
    cache.put("b", kv(3))  # replaced before (or while) its first version is written: the newest is what lands
    assert wait_for(lambda: "nvme" in cache.info("b").tiers)
    cache.offload("b", to="nvme")
    assert_same(cache.get("b", device="cpu"), kv(3))


def test_what_the_queue_wrote_survives_a_kill(tmp_path: Path) -> None:
    root = tmp_path / "root"
    code = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import tiercache
        from helpers import kv, policy
        cache = tiercache.TierCache(root={str(root)!r}, policy=policy(placement={{"write": "behind"}}))
        cache.put("a", kv(1))
        while "nvme" not in cache.info("a").tiers:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(): only what the queue wrote is on disk
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    with tiercache.TierCache(root=root, policy=policy()) as cache:
        assert_same(cache["a"], kv(1))


def test_reads_overtake_the_queue(tmp_path: Path) -> None:
    armed, reading, release = threading.Event(), threading.Event(), threading.Event()

    class SlowReads(FileOps):
        def preadv(self, fd: int, buffers: Any, offset: int) -> int:
            if armed.is_set() and "/c/" in os.readlink(f"/proc/self/fd/{fd}"):
                reading.set()
                release.wait(10)
            return super().preadv(fd, buffers, offset)

    with tiercache.TierCache(root=tmp_path / "root", policy=BEHIND, files=SlowReads()) as cache:
        cache.put("disk", kv(1))
        assert wait_for(lambda: "nvme" in cache.info("disk").tiers)
        cache.offload("disk", to="nvme")
        armed.set()
        reader = threading.Thread(target=lambda: cache.get("disk", device="cpu"))
        reader.start()
        assert reading.wait(10)
        cache.put("new", kv(2))
        time.sleep(0.5)
        assert cache.info("new").tiers == ("hbm",)  # the read is in flight: the queue waits
        release.set()
        reader.join(10)
        assert wait_for(lambda: "nvme" in cache.info("new").tiers)
