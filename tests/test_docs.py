"""The documentation stays true to the code and to the repository: the generated policy reference is current and
names every key, the README stays short, and nothing tracked points outside the repository."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

import tiercache
from tiercache.policy.schema import describe_keys
from tiercache.tools import policy_doc

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 185  # what, install, three quick starts (CPU, GPU, diffusers), concepts, status
OUTSIDE = "../" + "shared"  # spelt in two pieces, so that this file does not refer to it


def test_every_key_is_documented_in_the_policy_reference() -> None:
    reference = (ROOT / "docs" / "policy.md").read_text()
    for key, _default, doc in describe_keys():
        assert doc, f"{key} has no meaning in tiercache/policy/schema.py"
        assert f"| `{key}` |" in reference, key


def test_the_policy_reference_is_what_the_generator_writes_now() -> None:
    reference = (ROOT / "docs" / "policy.md").read_text()
    assert reference == policy_doc.render(), f"docs/policy.md is out of date: run `{policy_doc.COMMAND}`"


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move detail to docs/ or bench/NOTES.md"
    )


def test_the_readme_cpu_quick_start_runs(tmp_path: Path) -> None:
    snippet = _python_block((ROOT / "README.md").read_text(), "## Quick start: CPU")
    assert 'root="/tmp/tc"' in snippet
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(snippet.replace('root="/tmp/tc"', f"root={str(tmp_path / 'tc')!r}"), {})
    lines = printed.getvalue().splitlines()
    assert lines[0] == "hbm" and lines[-2:] == ["nvme", "True"], lines


def test_no_tracked_file_refers_outside_the_repository() -> None:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout with git available ({exc})")
    offenders = []
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        if OUTSIDE.encode() in path.read_bytes():
            offenders.append(name)
    assert not offenders, f"these tracked files refer to {OUTSIDE}, outside the repository: {offenders}"


def _python_block(doc: str, heading: str) -> str:
    section = doc.split(heading, 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_format_spec_holds_for_an_entry_the_cache_writes(tmp_path: Path) -> None:
    """docs/format.md: the tree, the manifest, the arrays and the chunks of a real entry, read back by the spec's
    own zarr-python snippet bit-exact."""
    tensors = {
        "k": torch.randn(3, 5).to(torch.bfloat16),
        "f8": torch.randn(7).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4, dtype=torch.int16),
        "mask": torch.tensor([True, False]),
    }
    key = "flux/seed42/kv"
    root = tmp_path / "tc"
    with tiercache.TierCache(root=root, policy="cpu", device="cpu") as cache:
        cache.put(key, tensors, write_through=True)
    assert sorted(p.name for p in root.iterdir()) == [
        ".lock",  # kept: removing it would let a process lock a new file while another holds the old one
        "entries",
        "index.sqlite3",
        "index.sqlite3-signal",
        "members",
        "tmp",
        "trash",
    ]
    assert not list((root / "members").iterdir())  # a closed cache leaves no member behind
    (entry,) = [p for p in (root / "entries").iterdir() if p.is_dir()]
    assert entry.name.split("-")[0] == hashlib.sha256(key.encode()).hexdigest()[:32]
    manifest = json.loads((entry / "zarr.json").read_text())["attributes"]["tiercache"]
    assert (manifest["format"], manifest["version"], manifest["key"]) == ("tiercache-entry", 2, key)
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}  # the seal, as the spec defines it
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert manifest["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    for index, (spec, (name, tensor)) in enumerate(zip(manifest["tensors"], tensors.items(), strict=True)):
        assert (spec["name"], spec["array"], spec["shape"]) == (name, f"t{index}", list(tensor.shape))
        array = json.loads((entry / spec["array"] / "zarr.json").read_text())
        assert [c["name"] for c in array["codecs"]] == ["bytes", "crc32c"]
        chunk = entry / spec["array"] / "/".join(["c"] + ["0"] * tensor.dim())
        if tensor.numel() == 0:
            assert not chunk.exists() and spec["crc32c"] is None
            continue
        raw = chunk.read_bytes()
        assert raw[:-4] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert int.from_bytes(raw[-4:], "little") == spec["crc32c"]
    namespace: dict[str, object] = {}
    snippet = _python_block((ROOT / "docs" / "format.md").read_text(), "## Reading an entry with zarr-python")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(snippet.replace("/mnt/nvme/tc", str(root)), namespace)
    back = namespace["tensors"]
    assert isinstance(back, dict) and list(back) == list(tensors)
    for name, tensor in tensors.items():
        got = back[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
