"""Policy files: presets load, sizes parse, and every malformed file is refused naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiercache
from tiercache import Policy, PolicyError, parse_size
from tiercache.policy.schema import resolve_policy


@pytest.mark.parametrize("name", ["cpu", "h100", "h200", "rtx-pro-6000-blackwell"])
def test_every_preset_loads_and_describes_its_hardware(name: str) -> None:
    p = Policy.preset(name)
    assert p.name == name
    assert p.description
    assert p.tiers.hbm.capacity > 0 and p.tiers.host.capacity > 0 and p.tiers.nvme.capacity > 0
    assert p.source.endswith(f"policies/{name}.toml")


def test_presets_are_found_by_name() -> None:
    assert {"cpu", "h100", "h200", "rtx-pro-6000-blackwell"} <= set(tiercache.preset_names())


def test_the_issue_example_file_parses(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        '[tiers.hbm]\ncapacity = "2GiB"\n[tiers.host]\ncapacity = "8GiB"\n'
        '[tiers.nvme]\ncapacity = "100GiB"\n[eviction]\nrule = "lru"\n'
    )
    p = Policy.load(f)
    assert (p.tiers.hbm.capacity, p.tiers.host.capacity, p.tiers.nvme.capacity) == (2 << 30, 8 << 30, 100 << 30)
    assert p.eviction.rule == "lru"
    assert resolve_policy(str(f)) == p and resolve_policy(f) == p


def test_keys_left_out_take_their_defaults(tmp_path: Path) -> None:
    f = tmp_path / "sparse.toml"
    f.write_text('[tiers.host]\nmax_entry = "1GiB"\n')
    p = Policy.load(f)
    default = Policy()
    assert p.tiers.host.capacity == default.tiers.host.capacity
    assert p.tiers.host.max_entry == 1 << 30
    assert p.tiers.nvme == default.tiers.nvme and p.placement == default.placement


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[tiers.hbm]\ncapacty = "1GiB"\n', ["tiers.hbm.capacty", "capacity"]),
        ("[tierz]\n", ["tierz", "tiers"]),
        ("[tiers.ssd]\ncapacity = 1\n", ["tiers.ssd", "nvme"]),
        ("[tiers.hbm]\ncapacity = -5\n", ["tiers.hbm.capacity", "negative"]),
        ('[tiers.host]\ncapacity = "-1GiB"\n', ["tiers.host.capacity", "not a size"]),
        ('[tiers.host]\ncapacity = "8 gigs"\n', ["tiers.host.capacity", "KiB"]),
        ("[tiers.host]\ncapacity = true\n", ["tiers.host.capacity", "boolean"]),
        ('[tiers.nvme]\nthreads = "four"\n', ["tiers.nvme.threads", "integer"]),
        ("[tiers.nvme]\nthreads = 0\n", ["tiers.nvme.threads", ">= 1"]),
        ('[tiers.nvme]\ntask_size = "5000"\n', ["tiers.nvme.task_size", "4096"]),
        ('[tiers.nvme]\nio = "fast"\n', ["tiers.nvme.io", "'o_direct'"]),
        ('[tiers.nvme]\nverify_checksums = "yes"\n', ["tiers.nvme.verify_checksums", "true or false"]),
        ('[eviction]\nrule = "random"\n', ["eviction.rule", "'lru'"]),
        ('[placement]\non_full = "panic"\n', ["placement.on_full", "'demote'"]),
        ("tiers = 3\n", ["tiers", "table"]),
        ("name = 7\n", ["name", "string"]),
        ('chosen = "mine"\n', ["unknown key 'chosen'", "allowed here"]),  # set by policy="auto", not by a file
        ('source = "x.toml"\n', ["unknown key 'source'", "allowed here"]),
        ('base = "gb300"\n', ["base", "no policy preset named 'gb300'", "h100"]),
        ("[tiers.hbm\n", ["not valid TOML"]),
    ],
)
def test_a_bad_policy_file_is_refused_naming_file_and_key(tmp_path: Path, text: str, names: list[str]) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PolicyError) as err:
        Policy.load(f)
    message = str(err.value)
    assert str(f) in message
    for name in names:
        assert name in message
    assert isinstance(err.value, ValueError) and isinstance(err.value, tiercache.TierCacheError)


def test_unknown_preset_and_missing_file_say_what_exists(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cpu"):
        Policy.preset("gb200")
    with pytest.raises(PolicyError, match="no such policy file"):
        Policy.load(tmp_path / "absent.toml")
    with pytest.raises(PolicyError, match="preset name"):
        resolve_policy(42)  # type: ignore[arg-type]


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(PolicyError, match="capacity"):
        tiercache.policy.schema.TierBudget(capacity=-1)
    assert tiercache.policy.schema.TierBudget(capacity="1KiB").capacity == 1024  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("0", 0),
        ("1B", 1),
        ("1KiB", 1024),
        ("2 MiB", 2 << 20),
        ("8GiB", 8 << 30),
        ("1TiB", 1 << 40),
        ("1KB", 1000),
        ("14GB", 14 * 10**9),
        ("2TB", 2 * 10**12),
        ("1.5GiB", 3 << 29),
        ("8gib", 8 << 30),
    ],
)
def test_sizes_parse_in_binary_and_decimal_units(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [-1, "1.3B", "GiB", "1 XB", 1.5, None, "1e9"])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
