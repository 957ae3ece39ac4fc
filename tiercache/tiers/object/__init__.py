"""The object tier: entries in an S3 bucket through obstore (tier.py), over a thin client wrapper (store.py)."""

from .tier import ObjectTier

__all__ = ["ObjectTier"]
