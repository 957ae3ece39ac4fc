"""The remote tier: entries in a Mooncake Store (tier.py), over a thin client wrapper (store.py)."""

from .tier import RemoteTier

__all__ = ["RemoteTier"]
