"""Content fingerprints: what keys are made of, so that a changed model or a different input never meets an entry
made from another. Never a pointer or an id: an address is reused once its tensor is freed."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from ...entry import as_bytes
from ...io.aligned import buffer_of
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
    stamp = _stamp(tensors)
    known = _known.get(module)
    trusted = all(version is not None for _, _, version, *_ in stamp)  # inference tensors have no counter
    if known is not None and not fresh and trusted and known[0] == stamp:
        return known[1]
    value = digest(tensors, type(module).__qualname__)
    _known[module] = (stamp, value)
    return value


SAMPLE = 4096  # bytes of each tensor's start, middle and end in a stamp


def _stamp(tensors: list[tuple[str, torch.Tensor]], *, sampled: bool = True) -> tuple[Any, ...]:
    """What tells whether a module's tensors may have changed since its fingerprint: each one's address, version
    counter, dtype, shape, and, `sampled`, a CRC of three 4 KiB samples of its bytes (a write through `.data`, as
    fuse_lora makes, bumps no counter and keeps the address: the samples see it)."""
    return tuple(
        (name, t.data_ptr(), _version(t), t.dtype, tuple(t.shape), _sample(t) if sampled else 0) for name, t in tensors
    )


def quick_stamp(module: torch.nn.Module) -> tuple[Any, ...]:
    """The module's stamp without the byte samples: addresses, version counters, dtypes, shapes (cheap enough
    for every forward; blind to writes through `.data`)."""
    return _stamp(module_tensors(module), sampled=False)


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter: never trusted
        return None


def _sample(tensor: torch.Tensor) -> int:
    data = tensor.detach()
    if not data.is_contiguous() or data.numel() == 0:
        return 0
    raw = as_bytes(data)
    n = raw.numel()
    crc = 0
    for start in {0, max(0, n // 2 - SAMPLE // 2), max(0, n - SAMPLE)}:
        crc = crc32c_anywhere(raw[start : start + SAMPLE], crc)
    return crc


class TensorMemo:
    """Values worked out from (or for) a tensor object, remembered while that object lives unmodified: a pipeline
    passes the same prompt embedding at every step. Keyed by identity (tensors compare by value) with a weak
    reference, so a freed tensor's reused address or id never finds another's value."""

    def __init__(self) -> None:
        self._values: dict[int, tuple[weakref.ref[torch.Tensor], int, Any]] = {}

    def lookup(self, tensor: torch.Tensor) -> Any:
        """What was remembered for this very tensor, unmodified since; None otherwise."""
        version = _version(tensor)
        known = self._values.get(id(tensor))
        if known is not None and version is not None and known[0]() is tensor and known[1] == version:
            return known[2]
        return None

    def remember(self, tensor: torch.Tensor, value: Any) -> None:
        version = _version(tensor)
        if version is not None:  # an inference tensor has no version counter: never remembered
            ident = id(tensor)
            self._values[ident] = (weakref.ref(tensor, lambda _: self._values.pop(ident, None)), version, value)


_hashed = TensorMemo()


def content_hash(tensor: torch.Tensor) -> str:
    """A 128-bit blake2b of one input tensor's dtype, shape and bytes (a context, a prompt's tensor: small, so
    hashed in full on the host, where a CRC's 32 bits would collide among some 10^5 prompts), remembered while that
    tensor object lives unmodified."""
    value = _hashed.lookup(tensor)
    if value is None:
        value = _blake2b(tensor)
        _hashed.remember(tensor, value)
    return str(value)


def _blake2b(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous()
    h = hashlib.blake2b(f"{data.dtype}|{tuple(data.shape)}|".encode(), digest_size=16)
    if data.numel():
        h.update(buffer_of(as_bytes(data if data.device.type == "cpu" else data.cpu())))
    return h.hexdigest()


def hold(module: torch.nn.Module, value: str) -> None:
    """Record that the module's weights are in the cache under fingerprint `value` (placeholders in the module)."""
    _held[module] = value


def release(module: torch.nn.Module) -> None:
    """The module holds its own weights again: the bytes stored under the fingerprint it was held by (so that
    parking it again, unchanged, does not hash it again)."""
    value = _held.pop(module, None)
    if value is not None:
        _known[module] = (_stamp(module_tensors(module)), value)


def held_fingerprint(module: torch.nn.Module) -> str | None:
    """The fingerprint a module's weights are held in the cache under (parked or blocks offloaded), else None."""
    return _held.get(module)
