"""The documentation stays true to the code and to the repository: the generated policy reference is current and
names every key, the README stays short, and nothing tracked points outside the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tiercache.policy.schema import describe_keys
from tiercache.tools import policy_doc

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 150
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
