"""The nvme tier and its on-disk layout (zarr v3 entries, checksummed)."""

from .tier import NvmeTier

__all__ = ["NvmeTier"]
