"""The host tier and its pool of (pinned) host memory."""

from .tier import HostTier

__all__ = ["HostTier"]
