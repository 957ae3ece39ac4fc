"""Entries: a key and a mapping of names to tensors; their specs (dtype, shape, bytes) and input checking."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .errors import EntryTypeError, EntryValueError

# Every dtype an entry may hold: its name on disk and in manifests. The set is what torch can view as bytes.
DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of an entry, as stored: everything needed to allocate it before its bytes arrive."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @cached_property  # specs are immutable; reads ask for these per tensor many times
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @cached_property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=tuple(tensor.shape))


@dataclass(frozen=True)
class EntrySpec:
    """What an entry is, independent of the tier it lives in."""

    key: str
    tensors: tuple[TensorSpec, ...]

    @cached_property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def of(cls, key: str, tensors: Mapping[str, torch.Tensor]) -> EntrySpec:
        return cls(key=key, tensors=tuple(TensorSpec.of(name, t) for name, t in tensors.items()))


def check_key(key: object) -> str:
    """A key is a non-empty string; it is never used as a file name, so any characters are allowed."""
    if not isinstance(key, str):
        raise EntryTypeError(f"cache keys are strings; got {type(key).__name__} {key!r}")
    if not key:
        raise EntryValueError("cache keys must be non-empty strings; got ''")
    return key


def normalize_tensors(key: str, tensors: object) -> Tensors:
    """The entry's tensors as dense torch tensors in the caller's order, without copying if possible.

    Accepts a mapping of str to torch tensors, numpy arrays or DLPack arrays (cupy: zero-copy); anything else
    raises EntryTypeError naming the item.
    Non-contiguous tensors are stored as their values: the engine makes the contiguous copy once the entry's
    size, known from shapes and dtypes alone, has been accepted. Gradients are not stored.
    """
    if not isinstance(tensors, Mapping):
        raise EntryTypeError(
            f"put({key!r}, ...) takes a mapping of names to tensors (e.g. {{'k': tensor}}); "
            f"got {type(tensors).__name__}"
        )
    out: Tensors = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise EntryTypeError(f"entry {key!r}: tensor names are strings; got {type(name).__name__} {name!r}")
        out[name] = _as_dense_tensor(key, name, value)
    return out


def _as_dense_tensor(key: str, name: str, value: Any) -> torch.Tensor:
    where = f"entry {key!r}, tensor {name!r}"
    if isinstance(value, np.ndarray):
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        try:
            value = torch.from_numpy(np.ascontiguousarray(value) if value.flags.writeable else value.copy())
        except TypeError:
            raise EntryTypeError(
                f"{where}: numpy dtype {value.dtype} has no torch equivalent; supported: {', '.join(DTYPES)}"
            ) from None
    if not isinstance(value, torch.Tensor) and hasattr(value, "__dlpack__"):  # cupy and friends: no copy
        try:
            value = torch.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError) as exc:
            raise EntryTypeError(f"{where}: DLPack import of {type(value).__name__} failed: {exc}") from None
    if not isinstance(value, torch.Tensor):
        raise EntryTypeError(
            f"{where}: expected a torch.Tensor, numpy.ndarray or cupy array, got {type(value).__name__}"
        )
    if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
        raise EntryTypeError(
            f"{where}: only dense tensors with data can be cached; got layout={value.layout}, device={value.device}"
        )
    if value.dtype not in DTYPE_NAMES:
        raise EntryTypeError(f"{where}: dtype {value.dtype} is not supported; supported: {', '.join(DTYPES)}")
    value = value.detach()
    if value.is_conj() or value.is_neg():  # lazy views: store the values they stand for
        value = value.resolve_conj().resolve_neg()
    return value  # made contiguous once a tier has accepted its size (a refused expand() view allocates nothing)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (works for 0-d, empty and every dtype in DTYPES)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def from_bytes(raw: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor `spec` describes, viewing the first `spec.nbytes` bytes of a uint8 buffer (no copy)."""
    return raw[: spec.nbytes].view(spec.torch_dtype).view(spec.shape)


ARRAY_KINDS = ("torch", "cupy", "numpy")


def convert_tensors(tensors: Tensors, as_: str) -> dict[str, Any]:
    """Tensors as `as_` arrays sharing their memory: "torch" (as they are), "cupy" (CUDA tensors, via DLPack)
    or "numpy" (CPU tensors). Raises EntryValueError for another kind or a tensor it cannot represent."""
    if as_ not in ARRAY_KINDS:
        raise EntryValueError(f"as_={as_!r} is not one of {', '.join(map(repr, ARRAY_KINDS))}")
    if as_ == "torch":
        return dict(tensors)
    if as_ == "numpy":
        bad = [n for n, t in tensors.items() if t.device.type != "cpu" or t.dtype in _NO_NUMPY]
        if bad:
            raise EntryValueError(
                f"as_='numpy' needs CPU tensors of a dtype numpy has; {bad[0]!r} is {tensors[bad[0]].dtype} on "
                f"{tensors[bad[0]].device}: get(..., device='cpu', as_='torch') and view it as you need"
            )
        return {n: t.numpy() for n, t in tensors.items()}
    try:
        import cupy  # noqa: PLC0415 - optional: only CUDA machines have it
    except ImportError:
        raise EntryValueError("as_='cupy' needs cupy: pip install 'tiercache-gpu[cuda13]' (or [cuda12])") from None
    bad = [n for n, t in tensors.items() if not t.is_cuda]
    if bad:
        raise EntryValueError(f"as_='cupy' returns GPU arrays; tensor {bad[0]!r} is on {tensors[bad[0]].device}")
    arrays = {}
    for name, tensor in tensors.items():
        try:
            arrays[name] = cupy.from_dlpack(tensor)
        except (TypeError, ValueError, BufferError) as exc:  # a dtype cupy lacks (float8, bfloat16 in older cupy)
            raise EntryValueError(
                f"as_='cupy' cannot represent tensor {name!r} ({tensor.dtype}): {exc}; get it as_='torch' and view it "
                "as a dtype cupy has (for instance .view(torch.int16) for bfloat16)"
            ) from exc
    return arrays


_NO_NUMPY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
