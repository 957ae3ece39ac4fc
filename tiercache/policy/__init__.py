"""How a cache decides: the policy schema, placement and eviction rules, the pathway cost model, and the machine a
policy is fitted to.

A leaf of the package: it imports nothing of the tiers or the data path. `load_policy(ref, machine=...)` is the one
way a cache turns a reference ("auto", a Policy, a TOML path, a preset name) into the policy and the hardware
profile it names, fitted to or checked against the machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .costmodel import Profile, profile_for
from .machine import Machine, auto_policy, check_fits
from .schema import Policy, resolve_policy

AUTO = "auto"


def load_policy(
    ref: str | Path | Policy | None = None, *, machine: Machine | None = None, stored_bytes: int = 0
) -> tuple[Policy, Profile]:
    """The policy `ref` names and its cost model's profile, each checked (a PolicyError names the file and key).

    `ref` None or "auto": the preset for `machine`'s device, its budgets scaled to the machine (`Policy.chosen`
    says how). Any other ref is explicit: where `machine` is given, a budget above what it has is a PolicyError.
    `machine` None: explicit policies go unchecked, and "auto" fits the RAM this process could get, with no device
    and no disk known (the CPU side only; a cache passes `Machine.detect(device, root)`). `stored_bytes`: what the
    root holds already, which the nvme budget may count as its own beside the free disk.
    """
    if ref is None or (isinstance(ref, str) and ref == AUTO):
        policy = auto_policy(machine or Machine.detect(torch.device("cpu"), None), stored_bytes)
    else:
        policy = resolve_policy(ref)
    if machine is not None:
        check_fits(policy, machine, stored_bytes)
    return policy, profile_for(policy)


__all__ = ["AUTO", "Machine", "Policy", "Profile", "load_policy"]
