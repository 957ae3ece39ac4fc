"""Whole-model stage switches: `park` moves every weight of a module into the cache (its memory freed), `restore`
brings them back, and `PipelineStages` keeps only the running components of a pipeline resident.

Keys carry the weights' content fingerprint: `<name>@<fingerprint>`. A changed model is parked under a new key, so
it never restores stale weights, and two same-class models under one name never collide. Parking weights that are
already in the cache under their fingerprint (parked before, unchanged) copies nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ... import TierCache
from ...errors import EntryValueError
from ...prefetch import PrefetchHandle
from ._import import ModelHook
from .blocks import placeholder
from .fingerprint import fingerprint, held_fingerprint, hold, module_tensors, release
from .hooks import Attached

HOOK_NAME = "tiercache_stages"


@dataclasses.dataclass(frozen=True)
class Parked:
    """Where a parked module's weights are: the entry `key` (`name@fingerprint`) and the device they came from."""

    key: str
    fingerprint: str
    device: torch.device


_parked: weakref.WeakKeyDictionary[torch.nn.Module, Parked] = weakref.WeakKeyDictionary()


def parked(module: torch.nn.Module) -> Parked | None:
    """The module's Parked record while it is parked, else None."""
    return _parked.get(module)


def park(
    module: torch.nn.Module, cache: TierCache, name: str, *, to: str | None = "host", write_through: bool | None = None
) -> Parked:
    """Move every parameter and buffer of `module` into `cache` (one entry) and free the module's memory: its
    tensors become empty placeholders on the same device. `to`: the tier the entry goes down to at once ("host"
    by default: off the device; None leaves it where the policy put it). Parking a parked module is a no-op."""
    already = _parked.get(module)
    if already is not None:
        return already
    if held_fingerprint(module) is not None:
        raise EntryValueError(
            f"park: this {type(module).__name__}'s blocks are offloaded to the cache (its weights are placeholders): "
            "remove() the offload first"
        )
    tensors = module_tensors(module)
    value = fingerprint(module)
    record = Parked(f"{name}@{value}", value, tensors[0][1].device if tensors else torch.device("cpu"))
    if record.key not in cache:
        cache.put(record.key, {n: t.detach() for n, t in tensors}, write_through=write_through)
    if to is not None:
        cache.offload(record.key, to=to)
    cache.pin(record.key)  # the only copy of the weights while parked: never evicted
    hold(module, value)
    for _, tensor in tensors:
        tensor.data = placeholder(tensor)
    _parked[module] = record
    return record


class Restoring:
    """A restore under way (`restore(..., wait=False)`): the weights load while the caller computes; `wait()`
    puts them in the module (on CUDA the current stream waits for the copies, not the host)."""

    def __init__(self, module: torch.nn.Module, cache: TierCache, record: Parked, handle: PrefetchHandle) -> None:
        self.module = module
        self.record = record
        self._cache = cache
        self._handle = handle
        self._done = False

    def wait(self) -> torch.nn.Module:
        if self._done:
            return self.module
        device = self._handle.device
        with torch.inference_mode(False):
            stored = self._handle.wait(stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
        # An entry held in the cache's hbm tier is returned as the cache's own tensors: the module gets a copy, so
        # that nothing done to the module later can change what the cache holds under this fingerprint.
        own = self._cache.tier_of(self.record.key) == "hbm"
        tensors = module_tensors(self.module)
        _check_matches(self.record.key, tensors, stored)
        for name, tensor in tensors:
            tensor.data = stored[name].clone() if own else stored[name]
        release(self.module)
        mine = _parked.pop(self.module, None)  # the park this module's pin belongs to (maybe not `record`'s)
        if mine is not None:
            with contextlib.suppress(EntryValueError):  # no pin left: the entry was replaced meanwhile
                self._cache.unpin(mine.key)
        self._done = True
        return self.module


def restore(
    module: torch.nn.Module,
    cache: TierCache,
    record: Parked | None = None,
    *,
    device: str | torch.device | None = None,
    wait: bool = True,
) -> Restoring:
    """Bring a parked module's weights back (to the device they were parked from, or `device`). With `wait=False`
    the load runs in the background and the returned handle's `wait()` finishes it: overlap the copy with
    whatever runs meanwhile. The entry stays in the cache: parking the unchanged module again copies nothing."""
    record = record if record is not None else _parked.get(module)
    if record is None:
        raise EntryValueError(f"restore: this {type(module).__name__} is not parked; pass the Parked park() returned")
    target = torch.device(device) if device is not None else record.device
    with torch.inference_mode(False):
        restoring = Restoring(module, cache, record, cache.prefetch(record.key, target))
    if wait:
        restoring.wait()
    return restoring


def _check_matches(key: str, tensors: list[tuple[str, torch.Tensor]], stored: dict[str, torch.Tensor]) -> None:
    names = [n for n, _ in tensors]
    if sorted(names) != sorted(stored):
        missing = sorted(set(names) - set(stored))[:3]
        extra = sorted(set(stored) - set(names))[:3]
        raise EntryValueError(
            f"restore: entry {key!r} holds other tensors than this module (missing {missing}, extra {extra}): it was "
            "parked from another model; restore the module it came from, or park this one"
        )
    for name, tensor in tensors:
        if stored[name].dtype != tensor.dtype:
            raise EntryValueError(
                f"restore: entry {key!r}: tensor {name!r} is {stored[name].dtype}, the module's is {tensor.dtype}"
            )


class PipelineStages:
    """Keeps a pipeline's running components resident and the others parked in the cache:

        stage = PipelineStages(pipe, cache)
        with stage(pipe.text_encoder):
            embeds = pipe.encode_prompt(...)
        with stage(pipe.transformer):
            ...

    or, for a whole `pipe(...)` call, `stage.auto()`: each component switches itself in when it first runs.
    Entering parks every other nn.Module component (under `<pipeline class>/<component name>`) and restores the
    named ones; `prefetch(module)` starts restoring the next stage's components in the background meanwhile.
    On CUDA, parking hands the freed memory back to the device (torch.cuda.empty_cache). `remove()` restores
    every component and takes the hooks of `auto()` off."""

    def __init__(self, pipe: Any, cache: TierCache, *, to: str | None = "host") -> None:
        self.cache = cache
        self.to = to
        self._names = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
        self._prefix = type(pipe).__name__
        self._coming: dict[int, Restoring] = {}
        self._hooks = Attached(HOOK_NAME)
        self._running: tuple[torch.nn.Module, ...] = ()

    def _name_of(self, module: torch.nn.Module) -> str:
        for name, candidate in self._names.items():
            if candidate is module:
                return name
        raise EntryValueError(f"PipelineStages: this {type(module).__name__} is not a component of the pipeline")

    def prefetch(self, *modules: torch.nn.Module) -> None:
        """Start restoring parked components now, to overlap their load with the stage that is running."""
        for module in modules:
            self._name_of(module)
            if parked(module) is not None and id(module) not in self._coming:
                self._coming[id(module)] = restore(module, self.cache, wait=False)

    def switch(self, *running: torch.nn.Module) -> None:
        """Park every component but `running`, and make those resident."""
        for module in running:
            self._name_of(module)  # a module that is not a component is refused before anything moves
        keep = {id(m) for m in running}
        freed = False
        for name, module in self._names.items():
            if id(module) not in keep and parked(module) is None:
                coming = self._coming.pop(id(module), None)
                if coming is not None:
                    coming.wait()
                freed = freed or any(t.is_cuda for _, t in module_tensors(module))
                park(module, self.cache, f"{self._prefix}/{name}", to=self.to)
        if freed:
            torch.cuda.empty_cache()
        for module in running:
            coming = self._coming.pop(id(module), None)
            if coming is not None:
                coming.wait()
            elif parked(module) is not None:
                restore(module, self.cache)
        self._running = running

    @contextlib.contextmanager
    def __call__(self, *running: torch.nn.Module) -> Iterator[None]:
        self.switch(*running)
        yield

    def auto(self) -> PipelineStages:
        """Switch components in as they run: a hook on each component and on its direct children (a VAE's
        `encode` and `decode` call those, not its `forward`) makes it the running one before its first call."""
        for module in self._names.values():
            hook = _SwitchHook(self, module)
            self._hooks.attach(module, hook)
            for child in module.children():
                if not isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # containers never run
                    self._hooks.attach(child, _SwitchHook(self, module))
        return self

    def _entering(self, module: torch.nn.Module) -> None:
        if not any(m is module for m in self._running) or parked(module) is not None:
            self.switch(module)

    def remove(self) -> None:
        """Take the hooks of auto() off and restore every parked component (the entries stay in the cache)."""
        self._hooks.detach()
        for module in self._names.values():
            coming = self._coming.pop(id(module), None)
            if coming is not None:
                coming.wait()
            elif parked(module) is not None:
                restore(module, self.cache)
        self._running = ()


class _SwitchHook(ModelHook):  # type: ignore[misc]
    def __init__(self, stages: PipelineStages, component: torch.nn.Module) -> None:
        super().__init__()
        self.stages = stages
        self.component = component

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.stages._entering(self.component)
        return args, kwargs
