"""How a cache decides: the policy schema, placement and eviction rules, and the pathway cost model.

A leaf of the package: it imports nothing of the tiers or the data path. `load_policy(ref)` is the one way a cache
turns a reference (a Policy, a TOML path, a preset name) into the policy and the hardware profile it names.
"""

from __future__ import annotations

from pathlib import Path

from .costmodel import Profile, profile_for
from .schema import Policy, resolve_policy


def load_policy(ref: str | Path | Policy | None) -> tuple[Policy, Profile]:
    """The policy `ref` names and its cost model's profile, each checked (a PolicyError names the file and key)."""
    policy = resolve_policy(ref)
    return policy, profile_for(policy)


__all__ = ["Policy", "Profile", "load_policy"]
