"""Manifest integrity: a damaged or edited manifest is skipped at open with a warning, left on disk, never served,
and never the reason another entry is removed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import MiB, assert_same, only_tier

import tiercache
from tiercache.tiers.nvme.format import seal

NVME = only_tier("nvme", 4 * MiB)
A = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
B = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4) + 100}


def _entries(root: Path) -> dict[str, Path]:
    """Each key's entry directory, read straight from the manifests."""
    found = {}
    for d in (root / "entries").iterdir():
        if d.is_dir():
            found[json.loads((d / "zarr.json").read_text())["attributes"]["tiercache"]["key"]] = d
    return found


@pytest.fixture
def template(tmp_path: Path) -> Path:
    root = tmp_path / "template"
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        cache.put("a", A)
        cache.put("b", B)
    return root


def _reopen_and_check(root: Path, a_dir: Path, b_dir: Path) -> dict[str, torch.Tensor] | None:
    """Open the root: b must be intact and still on disk, a's directory left there; returns what a reads as."""
    with tiercache.TierCache(root=root, policy=NVME) as cache:
        assert_same(cache.get("b"), B)
        got = cache.get("a") if "a" in cache else None
    assert a_dir.exists() and b_dir.exists()
    return got


def test_every_byte_of_a_manifest_flipped_in_turn_is_never_served(template: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(template, root)
    dirs = _entries(root)
    manifest = dirs["a"] / "zarr.json"
    original = manifest.read_bytes()
    served_intact = 0
    for i in range(len(original)):
        damaged = bytearray(original)
        damaged[i] ^= 0xFF
        manifest.write_bytes(bytes(damaged))
        got = _reopen_and_check(root, dirs["a"], dirs["b"])
        if got is not None:  # only a flip that changed nothing the manifest says may be read: none should
            assert_same(got, A)
            served_intact += 1
    assert served_intact == 0


def _edit(manifest_path: Path, change: dict[str, Any], *, reseal: bool) -> None:
    meta = json.loads(manifest_path.read_text())
    manifest = meta["attributes"]["tiercache"] | change
    if reseal:  # an editor who knows the format recomputes the seal
        manifest["manifest_sha256"] = seal(manifest)
    meta["attributes"]["tiercache"] = manifest
    manifest_path.write_text(json.dumps(meta))


EDITS = {
    "key": lambda m: {"key": "b", "written_ns": m["written_ns"] + 10**12},  # a claims to be a newer b
    "dtype-shape": lambda m: {"tensors": [m["tensors"][0] | {"dtype": "int32", "shape": [4, 3]}]},
    "tensor-name": lambda m: {"tensors": [m["tensors"][0] | {"name": "y"}]},
}


@pytest.mark.parametrize("reseal", [False, True])
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_skipped_with_a_warning_and_removes_nothing(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: str, reseal: bool
) -> None:
    """Unsealed, every edit is damage. Resealed, a key edit still fails (the directory name is the key's hash);
    a consistent edit of a's own dtype or names is what the manifest now says, and b is untouched either way."""
    change = EDITS[edit]
    root = tmp_path / "root"
    shutil.copytree(template, root)
    dirs = _entries(root)
    manifest = dirs["a"] / "zarr.json"
    _edit(manifest, change(json.loads(manifest.read_text())["attributes"]["tiercache"]), reseal=reseal)
    with caplog.at_level(logging.WARNING):
        got = _reopen_and_check(root, dirs["a"], dirs["b"])
    if reseal and edit != "key":
        assert got is not None
        return
    assert got is None
    assert str(dirs["a"]) in caplog.text and "skipping entry" in caplog.text
