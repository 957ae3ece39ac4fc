"""Block offload: a transformer's blocks keep their weights in the cache and fetch them just before they run.

Each block's parameters and buffers are one entry, placed by the cache's policy (host, or nvme for models larger
than RAM; on CUDA, nvme reads go straight to the GPU through kvikio where the policy allows). A ModelHook on each
block waits for its weights before forward, starts loading the next `lookahead` blocks (wrapping around to the
first: a denoising loop runs the model again), and puts placeholders back after forward, so the block's device copy
goes. On CUDA the wait is the current stream's, on the copies' events: the host does not block on the copies.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch

from ... import TierCache
from ...errors import EntryValueError
from ...prefetch import PrefetchHandle
from ._import import ModelHook
from .fingerprint import fingerprint, held_fingerprint, hold, module_tensors, release
from .hooks import Attached

HOOK_NAME = "tiercache_block_offload"


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks of a transformer: the members of its direct ModuleList children, in order (Wan:
    `blocks`; Flux: `transformer_blocks`, then `single_transformer_blocks`)."""
    return [
        (f"{name}.{i}", block)
        for name, child in model.named_children()
        if isinstance(child, torch.nn.ModuleList)
        for i, block in enumerate(child)
    ]


def placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """What stands in for an offloaded tensor: no elements, the same dtype and device (so `model.device` and
    `model.dtype` still answer; a forward that bypasses the hook fails on the shapes instead of computing)."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device)


class _Block:
    """One block: its entry, its tensors (the module's own Parameter and buffer objects) and their placeholders."""

    def __init__(self, name: str, module: torch.nn.Module, key: str) -> None:
        self.name = name
        self.module = module
        self.key = key
        self.tensors = module_tensors(module)
        self.device = self.tensors[0][1].device if self.tensors else torch.device("cpu")
        self.placeholders = [placeholder(t) for _, t in self.tensors]

    def load(self, stored: dict[str, torch.Tensor], *, own: bool = False) -> None:
        for name, tensor in self.tensors:
            tensor.data = stored[name].clone() if own else stored[name]

    def unload(self) -> None:
        for (_, tensor), empty in zip(self.tensors, self.placeholders, strict=True):
            tensor.data = empty


class _BlockHook(ModelHook):  # type: ignore[misc]
    def __init__(self, offload: BlockOffload, index: int) -> None:
        super().__init__()
        self.offload = offload
        self.index = index

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.offload._onload(self.index)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.offload._blocks[self.index].unload()
        return output


class BlockOffload:
    """Blocks offloaded by `offload_blocks`; `remove()` puts every weight back and takes the hooks off."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: TierCache,
        blocks: Sequence[tuple[str, torch.nn.Module]],
        *,
        lookahead: int,
        to: str | None,
        prefix: str,
        write_through: bool | None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.lookahead = lookahead
        self.fingerprint = fingerprint(model)
        self._blocks = [_Block(name, module, f"{prefix}{self.fingerprint}/{name}") for name, module in blocks]
        self._pending: dict[int, PrefetchHandle] = {}
        self._removed = False
        self._hooks = Attached(HOOK_NAME)
        for block in self._blocks:
            if block.key not in cache:  # the same weights offloaded before (this process or another): reused
                cache.put(block.key, {name: t.detach() for name, t in block.tensors}, write_through=write_through)
                _stored.add((id(cache), block.key))
        if to is not None:
            cache.offload([b.key for b in self._blocks], to=to)
        hold(model, self.fingerprint)
        _readers.update((id(cache), b.key) for b in self._blocks)
        for index, block in enumerate(self._blocks):
            block.unload()
            self._hooks.attach(block.module, _BlockHook(self, index))

    @property
    def keys(self) -> list[str]:
        """The blocks' entry keys, in order."""
        return [b.key for b in self._blocks]

    @torch.compiler.disable  # type: ignore[misc]
    @torch.inference_mode(False)  # the cache's copies are ordinary tensors, under the caller's inference_mode too
    def _onload(self, index: int) -> None:
        block = self._blocks[index]
        first = block.tensors[0][1] if block.tensors else None
        if first is not None and (first.dtype, first.device) != (block.placeholders[0].dtype, block.device):
            raise EntryValueError(
                f"offload_blocks: block {block.name!r} was moved or cast ({block.placeholders[0].dtype} on "
                f"{block.device} -> {first.dtype} on {first.device}) while its weights were in the cache: remove() "
                "the offload first, then move the model, then offload it again"
            )
        handle = self._pending.pop(index, None)
        if handle is None:
            handle = self.cache.prefetch(block.key, block.device)
        block.load(handle.wait(stream=_current_stream(block.device)))
        for step in range(1, self.lookahead + 1):
            ahead = (index + step) % len(self._blocks)
            if ahead != index and ahead not in self._pending:
                self._pending[ahead] = self.cache.prefetch(self._blocks[ahead].key, self._blocks[ahead].device)

    def remove(self, *, delete: bool = False) -> None:
        """Put every block's weights back in the model (its own memory, on the device each block was on) and take
        the hooks off: the model is then as it was (a second call does nothing). The entries stay in the cache
        (evicted by its rules, reused by
        the next offload of the same weights) unless `delete`: then the entries this process stored go, unless
        another offload in this process still reads them (entries found in the cache, stored by another process
        on a shared root, stay: that process may be reading them)."""
        if self._removed:
            return
        for handle in self._pending.values():
            handle.wait()
        self._pending.clear()
        for block in self._blocks:
            with torch.inference_mode(False):
                stored = self.cache.get(block.key, device=block.device)
            if stored is None:
                raise EntryValueError(
                    f"offload_blocks: the weights of block {block.name!r} (entry {block.key!r}) are no longer in "
                    "the cache (deleted while offloaded): the block cannot be restored; reload the model"
                )
            block.load(stored, own=True)
        self._hooks.detach()
        release(self.model)
        self._removed = True
        for block in self._blocks:
            entry = (id(self.cache), block.key)
            _readers[entry] -= 1
            if _readers[entry] == 0:
                del _readers[entry]
                if delete and entry in _stored:
                    _stored.discard(entry)
                    self.cache.delete(block.key)


# Offloads in this process reading each entry, and the entries this process stored: remove(delete=True) deletes
# only what it stored and nobody here still reads.
_readers: collections.Counter[tuple[int, str]] = collections.Counter()  # (id of the cache, key)
_stored: set[tuple[int, str]] = set()


def _current_stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def offload_blocks(
    model: torch.nn.Module,
    cache: TierCache,
    *,
    lookahead: int = 2,
    blocks: Sequence[str] | None = None,
    to: str | None = "host",
    prefix: str = "blocks/",
    write_through: bool | None = None,
) -> BlockOffload:
    """Keep each transformer block's weights in `cache` and load them just before the block runs.

    `blocks`: module names (default: every member of the model's ModuleList children). `to`: where the entries go
    at once (default "host": off the device; None leaves them where the policy put them; "nvme" for a model
    larger than RAM). Entries are keyed by the model's content fingerprint, so another process offloading the same
    weights on the same root reuses them and two models never share one. The blocks run on the device their
    weights were on. For inference: the weights are read, never written, while offloaded."""
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise EntryValueError(f"offload_blocks: lookahead must be an integer >= 0, got {lookahead!r}")
    if held_fingerprint(model) is not None:
        raise EntryValueError(
            f"offload_blocks: this {type(model).__name__}'s weights are in the cache already (blocks offloaded, or "
            "parked): remove() that offload, or restore() it, first"
        )
    found = find_blocks(model) if blocks is None else [(name, model.get_submodule(name)) for name in blocks]
    if not found:
        raise EntryValueError(
            f"offload_blocks: {type(model).__name__} has no ModuleList of blocks; name them with blocks=[...]"
        )
    return BlockOffload(model, cache, found, lookahead=lookahead, to=to, prefix=prefix, write_through=write_through)
