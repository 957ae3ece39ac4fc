"""Shared fixtures: caches that close themselves, registries to parametrise contracts over, the gpu skip, and the
O_DIRECT skip (tests marked `direct_io` need a filesystem that allows it where the tests write their files)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from helpers import policy

import tiercache
from tiercache.io.posix import probe_direct_io
from tiercache.policy.schema import SHARED_TIERS, TIER_NAMES

CUDA_REASON = "needs CUDA: torch.cuda.is_available() is False on this machine (run `make test-gpu` on a GPU host)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "direct_io: needs O_DIRECT where the tests write (skipped with the reason where it is refused)"
    )


@pytest.fixture(scope="session")
def direct_io_reason(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """None where O_DIRECT works in the directory every tmp_path lies under, else why not and how to run there."""
    base = tmp_path_factory.getbasetemp()
    why = probe_direct_io(base)
    if why is None:
        return None
    return (
        f"needs O_DIRECT, not usable in {base}: {why}; run the tests on a filesystem that allows it "
        "(ext4, xfs): pytest --basetemp=/path/on/ext4/tiercache-tests"
    )


@pytest.fixture(autouse=True)
def _skip_without_direct_io(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("direct_io") is not None:
        reason = request.getfixturevalue("direct_io_reason")
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def nvme_mode(direct_io_reason: str | None) -> str:
    """The mode the nvme tier picks under io = "auto" in tmp_path, as pathways name it: O_DIRECT where it works."""
    return "o_direct" if direct_io_reason is None else "buffered"


SLOW_REASON = "slow: run with `pytest -m slow` (or TIERCACHE_SLOW=1); `make test` keeps to the fast ones"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = "slow" in (config.getoption("markexpr") or "") or bool(os.environ.get("TIERCACHE_SLOW"))
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=CUDA_REASON))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason=SLOW_REASON))


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
def tier_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each tier by name; for "object" and "remote", with the test servers behind only_tier(name)."""
    name = str(request.param)
    if name not in SHARED_TIERS:
        yield name
        return
    helpers.SHARED_SETTINGS[name] = request.getfixturevalue(f"{name}_tier_settings")
    yield name
    helpers.SHARED_SETTINGS.clear()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A SeaweedFS S3 server for the session, on free loopback ports, its credentials in the environment."""
    from tiercache.testing.servers import ACCESS_KEY, INSTALL, SECRET_KEY, S3Server, weed_binary

    try:
        import obstore  # noqa: F401
    except ImportError:
        pytest.skip(f"needs obstore for the object tier: {INSTALL}")
    if weed_binary() is None:
        pytest.skip(f"needs a SeaweedFS binary (weed) as the test S3 server: {INSTALL}")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def object_tier_settings(s3_server: Any, request: pytest.FixtureRequest) -> dict[str, Any]:
    """[tiers.object] keys for a prefix of its own in the test server's bucket (every test sees only its entries)."""
    from tiercache.testing.servers import BUCKET

    prefix = f"{request.node.name}-{os.getpid()}-{time.monotonic_ns()}"
    return {"url": f"s3://{BUCKET}/{prefix}", "endpoint": s3_server.endpoint, "timeout_s": 10.0, "retries": 1}


@pytest.fixture(scope="session")
def mooncake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Mooncake Store for the session (a master and one holder lending 256 MiB) on free loopback ports."""
    from tiercache.testing.servers import MOONCAKE_INSTALL, MooncakeServer, mooncake_binary
    from tiercache.tiers.remote.store import install_hint

    hint = install_hint()
    if hint is not None or mooncake_binary("mooncake_master") is None:
        pytest.skip(f"needs Mooncake for the remote tier: {hint or MOONCAKE_INSTALL}")
    server = MooncakeServer(tmp_path_factory.mktemp("mooncake"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def remote_tier_settings(mooncake_server: Any, request: pytest.FixtureRequest) -> dict[str, Any]:
    """[tiers.remote] keys for a prefix of its own in the test store (every test sees only its entries)."""
    return {
        "master": mooncake_server.address,
        "metadata_server": mooncake_server.metadata,
        "admin": mooncake_server.admin,
        "prefix": f"{request.node.name}-{os.getpid()}-{time.monotonic_ns()}".replace("/", "_"),
        "timeout_s": 10.0,
    }
