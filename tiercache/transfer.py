"""Copy streams and events: one ordering model, with a CUDA implementation and a CPU one.

A `Stream` runs the copies enqueued on it in order. `stream.record()` marks the point reached so far as an
`Event`; `stream.wait(event)` orders everything enqueued on the stream afterwards after that point. On CUDA these
are `torch.cuda.Stream` / `torch.cuda.Event` (a wait costs the host nothing); on CPU each copy stream is a worker
thread and an event a `threading.Event`. The consumer's own stream (`consumer_stream`) is the current CUDA stream,
or on CPU the calling thread itself: copies run at once and waits block.

Scheduling code (offload, reload, prefetch, layerwise streaming) is written against `Stream` and `Event` only,
so that its ordering runs, and is tested under injected delays, on machines without a GPU. Two rules keep it
safe (the bugs that corrupted KV caches in vLLM and images in diffusers' group offloading broke them):
- a consumer uses a tensor only after waiting on the event recorded after the copy that fills it;
- a buffer is not reused while a copy from or into it may be in flight: `Deferred` runs the release only once
  the copy's event has completed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .io.buffers import HostBuffers

log = logging.getLogger(__name__)

__all__ = [
    "CudaStream",
    "Deferred",
    "Event",
    "HostThread",
    "Stream",
    "Transfers",
    "WorkerStream",
    "all_of",
    "consumer_stream",
    "copy_in_chunks",
]


class Event(ABC):
    """A point in a stream: done once everything enqueued on the stream before it has completed."""

    @abstractmethod
    def query(self) -> bool:
        """Whether the point has been reached (never blocks)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Block the calling thread until the point is reached; raises the error of a copy that failed."""

    @abstractmethod
    def seconds_since(self, start: Event) -> float:
        """Seconds between `start` (an earlier event of the same stream) and this one; both must be done."""


class Stream(ABC):
    """An ordered queue of copies on one device."""

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue `dst.copy_(src)` (same shapes and dtypes) after everything enqueued before it."""

    @abstractmethod
    def wait(self, event: Event) -> None:
        """Order everything enqueued from now on after `event`."""

    @abstractmethod
    def record(self) -> Event:
        """An event marking everything enqueued so far."""

    host_buffers: HostBuffers | None = None  # where host memory for this stream's copies comes from, if set

    def empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A uint8 buffer on `device` for this stream's copies to fill (host memory from `host_buffers`: reused
        once nothing uses it, instead of fresh memory that the kernel zeroes on first touch)."""
        if device.type == "cpu" and self.host_buffers is not None:
            return self.host_buffers.empty(nbytes)[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def hand_over(self, tensors: Iterable[torch.Tensor], consumer: Stream) -> None:
        """Tensors this stream allocated are now used on `consumer`: their memory must outlive its work too."""
        return None

    def uses(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Work enqueued on this stream reads `tensors`: keep the memory of those the device allocator can keep
        (CUDA tensors, via record_stream); returns the others, which the caller holds until the work is done."""
        return list(tensors)


class _Done(Event):
    def __init__(self) -> None:
        self.at = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def seconds_since(self, start: Event) -> float:
        return self.at - getattr(start, "at", self.at)


class _ThreadEvent(Event):
    def __init__(self) -> None:
        self._flag = threading.Event()
        self._error: BaseException | None = None
        self.at = 0.0

    def set(self, error: BaseException | None) -> None:
        self._error = error
        self.at = time.perf_counter()
        self._flag.set()

    def seconds_since(self, start: Event) -> float:
        return self.at - getattr(start, "at", self.at)

    def query(self) -> bool:
        return self._flag.is_set()

    def synchronize(self) -> None:
        self._flag.wait()
        if self._error is not None:
            raise self._error


class HostThread(Stream):
    """The calling thread as a stream (the consumer on CPU): copies run at once, waits block until done."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self, event: Event) -> None:
        event.synchronize()

    def record(self) -> Event:
        return _Done()


class WorkerStream(Stream):
    """A CPU copy stream: one thread runs its copies in order.

    `before_copy` runs in the worker before each copy; tests pass a gate there to hold copies in flight and
    check that nobody observes or reuses their buffers early. A failed copy's error is raised by the
    `synchronize()` of the next event recorded after it.
    """

    def __init__(self, name: str, before_copy: Callable[[], None] | None = None) -> None:
        self.name = name
        self.before_copy = before_copy
        self._ops: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"tiercache-{name}", daemon=True)
        self._thread.start()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._ops.put(("copy", dst, src))

    def wait(self, event: Event) -> None:
        if not event.query():
            self._ops.put(("wait", event, None))

    def record(self) -> Event:
        event = _ThreadEvent()
        self._ops.put(("record", event, None))
        return event

    def close(self) -> None:
        """Finish what is enqueued, then stop the thread."""
        self._ops.put(("stop", None, None))
        self._thread.join()

    def _run(self) -> None:
        error: BaseException | None = None
        while True:
            op, a, b = self._ops.get()
            if op == "stop":
                return
            try:
                if op == "copy" and error is None:
                    if self.before_copy is not None:
                        self.before_copy()
                    a.copy_(b)
                elif op == "wait":
                    a.synchronize()
            except BaseException as exc:  # noqa: BLE001 - handed to the next event's synchronize()
                error = error or exc
            if op == "record":
                a.set(error)
                error = None


class _AllOf(Event):
    def __init__(self, events: list[Event]) -> None:
        self.events = events

    def query(self) -> bool:
        return all(e.query() for e in self.events)

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()

    def seconds_since(self, start: Event) -> float:
        raise NotImplementedError("a set of events has no single time")


def all_of(events: Iterable[Event]) -> Event:
    """One event, done when every one of `events` is."""
    pending = [e for e in events if not e.query()]
    return pending[0] if len(pending) == 1 else _AllOf(pending)


class _CudaEvent(Event):
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.raw = torch.cuda.Event(enable_timing=True)
        self.raw.record(stream)

    def seconds_since(self, start: Event) -> float:
        return float(start.raw.elapsed_time(self.raw)) / 1e3 if isinstance(start, _CudaEvent) else 0.0

    def query(self) -> bool:
        return bool(self.raw.query())

    def synchronize(self) -> None:
        self.raw.synchronize()


class CudaStream(Stream):
    """A `torch.cuda.Stream`: copies are `copy_(non_blocking=True)` on it; waiting on a CUDA event costs the host
    nothing, waiting on a CPU-side event (a read still landing in host memory) blocks the enqueuing thread."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None) -> None:
        self.device = device
        self.raw = stream if stream is not None else torch.cuda.Stream(device)
        self.before_copy: Callable[[], None] | None = None  # enqueued ahead of each copy (tests: a GPU-side delay)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.raw):
            if self.before_copy is not None:
                self.before_copy()
            dst.copy_(src, non_blocking=True)

    def wait(self, event: Event) -> None:
        if isinstance(event, _AllOf):  # each CUDA event waited on the GPU, not the set on the host
            for one in event.events:
                self.wait(one)
        elif isinstance(event, _CudaEvent):
            self.raw.wait_event(event.raw)
        else:
            event.synchronize()

    def record(self) -> Event:
        return _CudaEvent(self.raw)

    def empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        # Allocated in this stream's order: the caching allocator hands out memory no earlier work of it uses.
        with torch.cuda.stream(self.raw):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def hand_over(self, tensors: Iterable[torch.Tensor], consumer: Stream) -> None:
        if isinstance(consumer, CudaStream) and consumer.raw != self.raw:
            consumer.uses(tensors)

    def uses(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        others = []
        for tensor in tensors:
            if tensor.is_cuda:
                tensor.record_stream(self.raw)  # freed memory waits for this stream's work, not just its owner's
            else:
                others.append(tensor)
        return others


def consumer_stream(device: torch.device, stream: Any = None) -> Stream:
    """The stream a consumer computes on: `stream` if given (a torch.cuda.Stream or a tiercache Stream), else the
    current CUDA stream of `device`, else (CPU) the calling thread."""
    if isinstance(stream, Stream):
        return stream
    if stream is not None:
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream or a tiercache Stream, got {type(stream).__name__}")
        return CudaStream(stream.device, stream)
    if device.type == "cuda":
        return CudaStream(device, torch.cuda.current_stream(device))
    return HostThread()


def copy_in_chunks(stream: Stream, pieces: Iterable[tuple[torch.Tensor, torch.Tensor]], chunk: int) -> None:
    """Enqueue flat uint8 copies (dst, src) in pieces of at most `chunk` bytes, so that a long reload and a long
    offload on two streams interleave instead of one waiting for the other."""
    for dst, src in pieces:
        for start in range(0, dst.numel(), chunk):
            end = min(start + chunk, dst.numel())
            stream.copy(dst[start:end], src[start:end])


class Transfers:
    """A cache's copy streams, one each way so that offloads and reloads overlap, and the releases waiting on them.

    On a CUDA device they are CUDA streams; on a CPU-only machine worker threads (then "hbm" is CPU memory too).
    Copies between two CPU tensors on a CUDA machine run in the calling thread.
    """

    def __init__(self, device: torch.device, chunk: int, host_buffers: HostBuffers | None = None) -> None:
        self.device = device
        self.chunk = chunk
        self.deferred = Deferred()
        # Host memory that reloads into CPU memory land in, reused once no tensor uses it.
        self.host_buffers = host_buffers if host_buffers is not None else HostBuffers()
        self.offload: Stream
        self.reload: Stream
        if device.type == "cuda":
            self.offload, self.reload = CudaStream(device), CudaStream(device)
        else:
            self.offload, self.reload = WorkerStream("offload"), WorkerStream("reload")
            self.reload.host_buffers = self.host_buffers

    def offload_stream(self, producers: Iterable[torch.device]) -> Stream:
        """The stream copying tensors on `producers` into host memory: the calling thread unless they are all on
        the cache's device (another GPU's current stream is not ordered with ours)."""
        producers = set(producers)
        if self.device.type == "cuda" and producers != {self.device}:
            return HostThread()
        return self.offload

    def reload_stream(self, device: torch.device) -> Stream:
        """The stream copying host memory to `device` (the calling thread for any device but the cache's)."""
        if self.device.type == "cuda" and device != self.device:
            host = HostThread()
            host.host_buffers = self.host_buffers
            return host
        return self.reload

    def copy(self, stream: Stream, pieces: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        copy_in_chunks(stream, pieces, self.chunk)

    def deliver(self, tensors: Iterable[torch.Tensor], ready: Event, consumer: Stream) -> None:
        """Hand loaded tensors to `consumer`: it waits for `ready` (the copies filling them), and the memory the
        reload stream allocated for them outlives the consumer's work."""
        consumer.wait(ready)
        self.reload.hand_over(tensors, consumer)

    def close(self) -> None:
        """Wait for every copy and release, then stop the CPU workers."""
        self.deferred.settle_all()
        for stream in (self.offload, self.reload):
            if isinstance(stream, WorkerStream):
                stream.close()
        self.host_buffers.close()


class Deferred:
    """Releases that must wait for copies in flight: `after(event, release)` runs `release` once `event` is done.

    Nothing is polled in the background: `collect()` (called before allocating and on every transfer) runs what
    is due, `settle()` blocks for the oldest pending release; both are thread-safe.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[Event, Callable[[], None]]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def after(self, event: Event, release: Callable[[], None]) -> None:
        if event.query():
            _run(release)
            return
        with self._lock:
            self._pending.append((event, release))

    def collect(self) -> int:
        """Run every release whose event is done; returns how many ran."""
        due: list[tuple[Event, Callable[[], None]]] = []
        with self._lock:
            kept: deque[tuple[Event, Callable[[], None]]] = deque()
            for event, release in self._pending:
                (due if event.query() else kept).append((event, release))
            self._pending = kept
        for _, release in due:
            _run(release)
        return len(due)

    def settle(self) -> bool:
        """Wait for the oldest pending release and run it (and any others now due); False when none is pending."""
        with self._lock:
            if not self._pending:
                return False
            event, release = self._pending.popleft()
        try:
            event.synchronize()
        except BaseException:  # noqa: BLE001 - a failed copy no longer uses its buffers either
            pass
        _run(release)
        self.collect()
        return True

    def settle_all(self) -> None:
        while self.settle():
            pass


def _run(release: Callable[[], None]) -> None:
    """Run one release; a failing one is logged, never allowed to stop the others or to fail an unrelated call."""
    try:
        release()
    except Exception:  # noqa: BLE001
        log.exception("tiercache: a deferred release failed")
