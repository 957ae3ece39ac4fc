"""Shared fixtures: caches that close themselves, registries to parametrise contracts over, the gpu skip."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import policy

import tiercache
from tiercache.policy.schema import TIER_NAMES

CUDA_REASON = "needs CUDA: torch.cuda.is_available() is False on this machine (run `make test-gpu` on a GPU host)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CacheFactory = Callable[..., tiercache.TierCache]


@pytest.fixture
def make_cache(tmp_path: Path) -> Iterator[CacheFactory]:
    """make_cache(policy, root=None): a TierCache under tmp_path that is closed after the test."""
    opened: list[tiercache.TierCache] = []

    def make(pol: tiercache.Policy | str | None = None, root: Path | None = None, **kwargs: Any) -> tiercache.TierCache:
        cache = tiercache.TierCache(root=root or tmp_path / "root", policy=pol or policy(), **kwargs)
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        cache.close()


@pytest.fixture(params=TIER_NAMES)
def tier_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)
