"""Background writes in the writer process (io/writer.py): the same files as a write done here, a failing step the
entry's StorageError with nothing left, and a child lost or refused its read of our memory a write done here."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import google_crc32c
import pytest
import torch
from conftest import CacheFactory
from helpers import MiB, assert_same, policy, wait_for

import tiercache
from tiercache import StorageError
from tiercache.entry import EntrySpec, as_bytes
from tiercache.io import FileOps, PosixIO
from tiercache.io.writer import WriterGone, WriterProcess
from tiercache.tiers.nvme.layout import WRITER_FROM, DiskLayout

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the writer process needs Linux (process_vm_readv)")


def entry(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of every awkward kind: an unaligned length, two dimensions, a scalar, an empty one."""
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randint(0, 255, (nbytes + 3,), dtype=torch.uint8, generator=g),
        "bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 8),
    }


@pytest.fixture(params=["buffered", "auto"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> DiskLayout:
    root = tmp_path / "root"
    root.mkdir()
    made = DiskLayout(root, PosixIO(root, threads=2, task_size=1 * MiB, io=str(request.param)))
    yield made
    made.close()
    made.io.close()


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def writer_children() -> list[int]:
    """This process's children running the writer's program, as the kernel lists them."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # a thread that has just ended
            continue
        for pid in children:
            try:
                if "writer_child.py" in Path(f"/proc/{pid}/cmdline").read_text():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_background_write_makes_the_same_files_as_one_written_here(layout: DiskLayout) -> None:
    tensors = entry(WRITER_FROM)
    spec = EntrySpec.of("wan/kv", tensors)
    answered = layout.writer.answered
    here = layout.stage("here", spec, tensors.values(), written_ns=123)
    assert layout.writer.answered == answered  # a write someone waits for stays in this process
    there = layout.stage("there", spec, tensors.values(), written_ns=123, background=True)
    assert layout.writer.answered > answered
    assert there.checksums == here.checksums
    assert files_under(there.path) == files_under(here.path)
    want = google_crc32c.value(as_bytes(tensors["big"]).numpy().tobytes())
    assert there.checksums[0] == want


def test_small_background_writes_start_no_process(layout: DiskLayout) -> None:
    tensors = {"kv": torch.ones(WRITER_FROM // 4 - 1)}
    answered = layout.writer.answered
    layout.stage("small", EntrySpec.of("k", tensors), tensors.values(), background=True)
    assert layout.writer.answered == answered


def test_a_writer_killed_mid_write_leaves_the_write_to_this_process(layout: DiskLayout) -> None:
    tensors = entry(96 * MiB, seed=1)
    spec = EntrySpec.of("k", tensors)
    killed: list[int] = []

    def kill_it() -> None:  # once the child has made the staging directory: it is writing the entry
        deadline = time.monotonic() + 30
        while not (layout.tmp_dir / "k").exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        pid = layout.writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_it)
    killer.start()
    staged = layout.stage("k", spec, tensors.values(), written_ns=5, background=True)
    killer.join()
    assert killed and gone(killed[0])
    reference = layout.stage("ref", spec, tensors.values(), written_ns=5)
    assert files_under(staged.path) == files_under(reference.path)
    assert sorted(p.name for p in layout.tmp_dir.iterdir()) == ["k", "ref"]  # nothing half-written left
    again = layout.stage("again", spec, tensors.values(), written_ns=5, background=True)
    assert layout.writer.pid not in (None, killed[0])  # the next write started a new child
    assert files_under(again.path) == files_under(reference.path)


def test_a_failing_step_is_the_entrys_storage_error_with_nothing_left(layout: DiskLayout) -> None:
    tensors = entry(WRITER_FROM)
    spec = EntrySpec.of("flux/weights", tensors)
    (layout.tmp_dir / "taken").mkdir()  # the child's mkdir of the staging directory fails: EEXIST
    with pytest.raises(StorageError, match="flux/weights") as raised:
        layout.stage("taken", spec, tensors.values(), background=True)
    assert tiercache.format_size(spec.nbytes) in str(raised.value)
    cause = raised.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EEXIST
    assert list(layout.tmp_dir.iterdir()) == []
    assert layout.writer.usable  # a disk's error is the write's, not the writer's


def test_a_child_that_cannot_read_our_memory_turns_the_writer_off(tmp_path: Path) -> None:
    writer = WriterProcess()
    try:
        step = {"chunk": str(tmp_path / "c"), "address": 4096, "nbytes": 4096, "direct": False}  # unmapped: EFAULT
        with pytest.raises(WriterGone, match="cannot read this process's memory"):
            writer.run([step])
        assert not writer.usable and writer.why_not is not None
        with pytest.raises(WriterGone, match="is off"):
            writer.run([{"mkdir": str(tmp_path / "d")}])
        assert not (tmp_path / "d").exists()
    finally:
        writer.close()


def test_steps_checksum_what_they_wrote_and_a_step_that_fails_names_its_file(tmp_path: Path) -> None:
    data = torch.randint(0, 255, (3 * MiB + 5,), dtype=torch.uint8)
    writer = WriterProcess()
    try:
        chunk = tmp_path / "d" / "c"
        steps = [{"mkdir": str(tmp_path / "d")}, {"small": str(tmp_path / "d" / "m"), "text": "{}"}]
        crcs = writer.run(
            [
                *steps,
                {"chunk": str(chunk), "address": data.data_ptr(), "nbytes": 3 * MiB + 5, "direct": False},
                {"fsync": str(tmp_path / "d")},
            ]
        )
        raw = data.numpy().tobytes()
        assert crcs == [google_crc32c.value(raw)]
        assert chunk.read_bytes() == raw + crcs[0].to_bytes(4, "little")
        assert (tmp_path / "d" / "m").read_text() == "{}"
        with pytest.raises(OSError) as raised:  # O_EXCL: a file is never overwritten
            writer.run([{"chunk": str(chunk), "address": data.data_ptr(), "nbytes": 16, "direct": False}])
        assert raised.value.errno == errno.EEXIST and raised.value.filename == str(chunk)
        assert writer.usable
    finally:
        writer.close()


def test_the_writer_ends_with_close_and_with_its_parent(tmp_path: Path) -> None:
    writer = WriterProcess()
    writer.run([{"mkdir": str(tmp_path / "a")}])
    pid = writer.pid
    assert pid is not None
    writer.close()
    assert gone(pid) and writer.pid is None

    program = (
        "import os, sys\n"
        "from tiercache.io.writer import WriterProcess\n"
        "w = WriterProcess()\n"
        f"w.run([{{'mkdir': {str(tmp_path / 'b')!r}}}])\n"
        "print(w.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    parent = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    orphan = int(parent.stdout.split()[0])
    wait_for(lambda: gone(orphan), timeout=10)


def test_a_forked_process_writes_through_a_writer_of_its_own(tmp_path: Path) -> None:
    writer = WriterProcess()
    try:
        writer.run([{"mkdir": str(tmp_path / "parent")}])
        parents = writer.pid
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own tensor, in its own memory
            code = 1
            try:
                data = ctypes.create_string_buffer(bytes([7]) * WRITER_FROM, WRITER_FROM)  # no torch after a fork
                address = ctypes.addressof(data)
                step = {"chunk": str(tmp_path / "c"), "address": address, "nbytes": WRITER_FROM, "direct": False}
                (crc,) = writer.run([step])
                ok = crc == google_crc32c.value(bytes([7]) * WRITER_FROM) and writer.pid not in (None, parents)
                os.write(write, b"ok" if ok else b"wrong")
                writer.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        answer = os.read(read, 16)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        assert answer == b"ok" and os.waitstatus_to_exitcode(status) == 0
        assert writer.pid == parents  # the parent's own child is untouched
    finally:
        writer.close()


def test_a_demotion_is_written_by_the_writer_and_read_back_by_another_cache(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    pol = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 64 * MiB}, "nvme": {"capacity": 128 * MiB}})
    cache = make_cache(pol, root=tmp_path / "root")
    tensors = entry(8 * MiB, seed=2)
    cache.put("kv", tensors)
    writer = WriterProcess.attach()  # the process's one writer, which the cache uses too
    try:
        answered = writer.answered
        cache.offload("kv", to="nvme")
        assert writer.answered > answered and len(writer_children()) == 1
        cache.close()
    finally:
        writer.detach()
    again = make_cache(pol, root=tmp_path / "root")
    assert_same(again.get("kv"), tensors)


def test_a_cache_given_its_own_file_calls_writes_everything_itself(make_cache: CacheFactory, tmp_path: Path) -> None:
    class Counting(FileOps):
        writes = 0

        def pwritev(self, fd: int, buffers: object, offset: int) -> int:
            Counting.writes += 1
            return super().pwritev(fd, buffers, offset)  # type: ignore[arg-type]

    pol = policy(tiers={"hbm": {"capacity": 0}, "host": {"capacity": 64 * MiB}, "nvme": {"capacity": 128 * MiB}})
    cache = make_cache(pol, files=Counting())
    cache.put("kv", entry(8 * MiB))
    writer = WriterProcess.attach()
    try:
        answered = writer.answered
        cache.offload("kv", to="nvme")
        assert Counting.writes > 0 and writer.answered == answered  # injected faults reach every write
    finally:
        writer.detach()


def test_a_ctrl_c_while_the_child_writes_is_raised_once_it_has_answered(tmp_path: Path) -> None:
    data = torch.randint(0, 255, (256 * MiB,), dtype=torch.uint8)
    small = torch.full((WRITER_FROM,), 3, dtype=torch.uint8)
    big = tmp_path / "big"
    armed = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if armed.is_set():  # a signal that comes late is dropped, not raised into the rest of the run
            raise KeyboardInterrupt

    def interrupt() -> None:  # once the child has created the file: it is writing 256 MiB
        deadline = time.monotonic() + 30
        while not big.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGINT)

    writer = WriterProcess()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        step = {"chunk": str(big), "address": data.data_ptr(), "nbytes": data.numel(), "direct": False}
        armed.set()
        sender = threading.Thread(target=interrupt)
        sender.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                writer.run([step])
        finally:
            sender.join()
            armed.clear()
        raw = data.numpy().tobytes()
        assert big.read_bytes() == raw + google_crc32c.value(raw).to_bytes(4, "little")
        after = {"chunk": str(tmp_path / "next"), "address": small.data_ptr(), "nbytes": small.numel(), "direct": False}
        assert writer.run([after]) == [google_crc32c.value(bytes([3]) * WRITER_FROM)]  # its own answer, in step
    finally:
        signal.signal(signal.SIGINT, previous)
        writer.close()


def test_one_child_serves_the_process_until_its_last_user_detaches(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""
        import os
        from tiercache.io.writer import WriterProcess
        first, second = WriterProcess.attach(), WriterProcess.attach()
        assert first is second
        first.run([{{"mkdir": {str(tmp_path / "a")!r}}}])
        pid = first.pid
        first.detach()
        assert second.pid == pid, "the first detach ended the child"
        second.detach()
        assert first.pid is None, "the last detach left the child running"
        again = WriterProcess.attach()
        assert again is not first
        again.detach()
        print(pid)
        """
    )  # in a process of its own: caches this test run left open would hold this process's writer
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: gone(int(done.stdout.split()[-1])), timeout=10)


def test_a_forked_process_alive_does_not_hold_the_parents_writer_open(tmp_path: Path) -> None:
    writer = WriterProcess()
    writer.run([{"mkdir": str(tmp_path / "a")}])
    pid = os.fork()
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    try:
        start = time.monotonic()
        writer.close()  # the child's copy of the pipe was closed at the fork: EOF reaches the writer
        assert time.monotonic() - start < 3
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_children_that_keep_dying_turn_the_writer_off(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read blocks the child until it is killed, however fast the disk
    writer = WriterProcess()
    try:
        for _ in range(3):

            def kill_it() -> None:
                wait_for(lambda: writer.pid is not None, timeout=10)
                os.kill(writer.pid or 0, signal.SIGKILL)

            killer = threading.Thread(target=kill_it)
            killer.start()
            with pytest.raises(WriterGone, match="lost"):
                writer.run([{"fsync": str(fifo)}])
            killer.join()
        assert not writer.usable and "3 writer processes in a row" in (writer.why_not or "")
    finally:
        writer.close()
