"""Content fingerprints: what keys are made of, so that a changed model or a different input never meets an entry
made from another. Never a pointer or an id: an address is reused once its tensor is freed."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from ...entry import as_bytes
from ...io.checksum import crc32c_anywhere

DIGEST_CHARS = 16  # hex characters of a fingerprint: 64 bits of blake2b


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """The dtype, shape and CRC32C of a tensor's bytes (computed where it lives: no copy off a GPU)."""
    data = tensor.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    crc = crc32c_anywhere(as_bytes(data)) if data.numel() else 0
    return f"{data.dtype}|{tuple(data.shape)}|{crc:08x};".encode()


def digest(named: Iterable[tuple[str, torch.Tensor]], *extra: object) -> str:
    """A fingerprint of named tensors and plain values (strings, numbers, None, tuples of them)."""
    h = hashlib.blake2b(digest_size=DIGEST_CHARS // 2)
    for value in extra:
        h.update(repr(value).encode() + b"\0")
    for name, tensor in named:
        h.update(name.encode() + b"=" + tensor_digest(tensor))
    return h.hexdigest()


def module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a module, persistent or not, by name (what a block or a park moves)."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


# A module's fingerprint is kept with a stamp of its tensors (address and version counter of each): loading a state
# dict, an in-place update or a new .data changes the stamp and the fingerprint is taken again. A write through
# `.data` of the same storage bypasses version counters: call `fingerprint(module, fresh=True)` after one.
_known: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


# Modules whose weights tiercache holds (parked, or blocks offloaded) keep the fingerprint taken when they went: their
# parameters are placeholders meanwhile.
_held: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def fingerprint(module: torch.nn.Module, *, fresh: bool = False) -> str:
    """The content fingerprint of a module's weights: its class, and every parameter and buffer's name, dtype,
    shape and bytes. Two same-class models with different weights never share one; the same weights always do.
    While tiercache holds a module's weights (parked, blocks offloaded), the fingerprint they were stored under."""
    held = _held.get(module)
    if held is not None:
        return held
    tensors = module_tensors(module)
    known = _known.get(module)
    if known is not None and known[0] == _stamp(tensors) and not fresh:
        return known[1]
    value = digest(tensors, type(module).__qualname__)
    _known[module] = (_stamp(tensors), value)
    return value


def _stamp(tensors: list[tuple[str, torch.Tensor]]) -> tuple[Any, ...]:
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors)


# Inputs are hashed once per tensor object and version: a pipeline passes the same prompt embedding every step.
# Keyed by identity (tensors compare by value) with a weak reference, so a freed tensor's reused address or id
# never finds another's hash.
_hashed: dict[int, tuple[weakref.ref[torch.Tensor], int, str]] = {}


def content_hash(tensor: torch.Tensor) -> str:
    """A fingerprint of one input tensor's content, remembered while that tensor object lives unmodified."""
    known = _hashed.get(id(tensor))
    if known is not None and known[0]() is tensor and known[1] == tensor._version:
        return known[2]
    value = digest([("", tensor)])
    ident = id(tensor)
    _hashed[ident] = (weakref.ref(tensor, lambda _: _hashed.pop(ident, None)), tensor._version, value)
    return value


def hold(module: torch.nn.Module, value: str) -> None:
    """Record that the module's weights are in the cache under fingerprint `value` (placeholders in the module)."""
    _held[module] = value


def release(module: torch.nn.Module) -> None:
    """The module holds its own weights again: the bytes stored under the fingerprint it was held by (so that
    parking it again, unchanged, does not hash it again)."""
    value = _held.pop(module, None)
    if value is not None:
        _known[module] = (_stamp(module_tensors(module)), value)
