"""The documentation stays true to the code: the generated policy reference is current and names every key."""

from __future__ import annotations

from pathlib import Path

from tiercache.policy.schema import describe_keys
from tiercache.tools import policy_doc

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_is_documented_in_the_policy_reference() -> None:
    reference = (ROOT / "docs" / "policy.md").read_text()
    for key, _default, doc in describe_keys():
        assert doc, key
        assert f"| `{key}` |" in reference, key


def test_the_policy_reference_is_what_the_generator_writes_now() -> None:
    reference = (ROOT / "docs" / "policy.md").read_text()
    assert reference == policy_doc.render(), f"docs/policy.md is out of date: run `{policy_doc.COMMAND}`"
