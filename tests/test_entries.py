"""Entries: every common dtype and shape round-trips bit-exactly through every tier; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CacheFactory
from helpers import MiB, assert_same, only_tier

import tiercache
from tiercache import EntryTypeError, EntryValueError

DTYPES = [
    torch.float32,
    torch.float16,
    torch.float64,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (so NaN payloads, denormals and -0.0 are covered), bools as 0/1."""
    gen = torch.Generator().manual_seed(seed)
    numel = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen).bool().reshape(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly_through_every_tier(
    make_cache: CacheFactory, tier_name: str, dtype: torch.dtype
) -> None:
    cache = make_cache(only_tier(tier_name))
    entry = {"x": sample(dtype, (3, 5, 7)), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 4))}
    cache.put("k", entry)
    assert cache.tier_of("k") == tier_name
    assert_same(cache.get("k"), entry)


@pytest.mark.parametrize("shape", [(), (0,), (5, 0, 3), (1,), (4097,), (3, 1, 1, 1, 2), (1025, 1023)], ids=str)
def test_shapes_round_trip_through_every_tier(make_cache: CacheFactory, tier_name: str, shape: tuple[int, ...]) -> None:
    cache = make_cache(only_tier(tier_name))
    entry = {"t": sample(torch.bfloat16, shape, seed=3)}
    cache.put("k", entry)
    assert_same(cache.get("k"), entry)


def test_a_large_entry_spanning_many_io_pieces_round_trips(make_cache: CacheFactory, tier_name: str) -> None:
    cache = make_cache(only_tier(tier_name, capacity=32 * MiB))
    entry = {"big": sample(torch.float16, (3 * MiB + 333,), seed=1), "odd": sample(torch.int8, (12345,), seed=2)}
    cache.put("k", entry)
    assert_same(cache.get("k"), entry)


def test_non_contiguous_inputs_are_stored_as_their_values(make_cache: CacheFactory, tier_name: str) -> None:
    cache = make_cache(only_tier(tier_name))
    base = sample(torch.float32, (16, 24), seed=4)
    views = {
        "t": base.t(),
        "strided": base[::3, 1::2],
        "expanded": torch.arange(4.0).expand(5, 4),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
    }
    cache.put("k", views)
    got = cache.get("k")
    for name, view in views.items():
        assert torch.equal(got[name], view.resolve_conj()), name
        assert got[name].is_contiguous()


def test_numpy_arrays_are_accepted_and_returned_as_torch(make_cache: CacheFactory, tier_name: str) -> None:
    cache = make_cache(only_tier(tier_name))
    readonly = np.arange(10, dtype=np.int32)
    readonly.flags.writeable = False
    arrays = {
        "f": np.linspace(0, 1, 33, dtype=np.float32),
        "ro": readonly,
        "big_endian": np.arange(5, dtype=">i4"),
        "fortran": np.asfortranarray(np.ones((3, 4))),
    }
    cache.put("k", arrays)
    got = cache.get("k")
    for name, array in arrays.items():
        assert isinstance(got[name], torch.Tensor)
        np.testing.assert_array_equal(got[name].numpy(), array)


def test_put_copies_by_default_and_can_take_ownership(make_cache: CacheFactory) -> None:
    cache = make_cache(only_tier("hbm"))
    t = torch.zeros(8)
    cache.put("copied", {"t": t})
    cache.put("owned", {"t": t}, copy=False)
    t += 1
    assert torch.equal(cache.get("copied")["t"], torch.zeros(8))
    assert torch.equal(cache.get("owned")["t"], torch.ones(8))


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ([torch.zeros(2)], "mapping of names to tensors"),
        ({"a": [1, 2, 3]}, "tensor 'a': expected a torch.Tensor, numpy.ndarray or cupy array, got list"),
        ({"a": torch.zeros(2), "b": "text"}, "tensor 'b'"),
        ({3: torch.zeros(2)}, "tensor names are strings"),
        ({"obj": np.array([object()])}, "tensor 'obj': numpy dtype object"),
        ({"sparse": torch.zeros(3, 3).to_sparse()}, "tensor 'sparse': only dense tensors"),
        ({"meta": torch.empty(3, device="meta")}, "tensor 'meta': only dense tensors"),
    ],
)
def test_bad_entries_raise_type_errors_naming_the_item_and_lose_nothing(
    make_cache: CacheFactory, tensors: object, fragment: str
) -> None:
    cache = make_cache()
    keep = {"t": torch.arange(4)}
    cache.put("bad", keep)
    with pytest.raises(EntryTypeError) as err:
        cache.put("bad", tensors)  # type: ignore[arg-type]
    assert fragment in str(err.value) and "'bad'" in str(err.value)
    assert isinstance(err.value, TypeError)
    assert_same(cache.get("bad"), keep)


@pytest.mark.parametrize(
    ("key", "error"), [(b"bytes", EntryTypeError), (7, EntryTypeError), (None, EntryTypeError), ("", EntryValueError)]
)
def test_bad_keys_are_refused(make_cache: CacheFactory, key: object, error: type[Exception]) -> None:
    cache = make_cache()
    with pytest.raises(error):
        cache.put(key, {"t": torch.zeros(1)})  # type: ignore[arg-type]
    with pytest.raises(error):
        cache.get(key)  # type: ignore[arg-type]


def test_any_string_is_a_key(make_cache: CacheFactory, tier_name: str) -> None:
    cache = make_cache(only_tier(tier_name))
    keys = ["../../etc/passwd", "/abs/path", "a/b\\c", "\x00nul", "ünïcødé ✓", "x" * 5000, ".", "CON"]
    for i, key in enumerate(keys):
        cache.put(key, {"t": torch.tensor([i])})
    for i, key in enumerate(keys):
        assert cache.get(key)["t"].item() == i


def test_an_empty_mapping_is_an_entry_of_zero_bytes(make_cache: CacheFactory, tier_name: str) -> None:
    cache = make_cache(only_tier(tier_name))
    cache.put("nothing", {})
    assert cache.get("nothing") == {} and cache.info("nothing").nbytes == 0


def test_error_classes_inherit_the_matching_builtins() -> None:
    assert issubclass(tiercache.EntryNotFoundError, KeyError)
    assert issubclass(tiercache.CapacityError, MemoryError)
    assert issubclass(tiercache.StorageError, OSError)
    assert issubclass(tiercache.CorruptEntryError, tiercache.StorageError)
    assert issubclass(tiercache.PolicyError, ValueError)
    for cls in (
        tiercache.EntryNotFoundError,
        tiercache.CapacityError,
        tiercache.StorageError,
        tiercache.PolicyError,
        tiercache.EntryTypeError,
        tiercache.EntryValueError,
        tiercache.CacheClosedError,
        tiercache.RootInUseError,
    ):
        assert issubclass(cls, tiercache.TierCacheError)
