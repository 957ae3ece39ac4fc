"""The remote tier: entries in a Mooncake Store, the memory that `mooncake_client` holders on one or more machines
lend to a pool one `mooncake_master` runs; shared by every cache that names the master, volatile.

It keeps the object tier's entry format, commit, listing and sweep (tiers/object/tier.py) over a different store
(store.py): a tensor is one store object per part, put from and read into host memory with no copy in between,
and an entry exists for others once its manifest does. What is lost with a holder or a master restart is a miss.
"""

from __future__ import annotations

from typing import ClassVar

from ...policy.schema import RemoteBudget, StoreBudget
from ..object.store import Store
from ..object.tier import ObjectTier
from .store import MooncakeStore


class RemoteTier(ObjectTier):
    durable = False  # volatile: flush() and write-behind still write its entries to nvme
    budget_type: ClassVar[type[StoreBudget]] = RemoteBudget

    @classmethod
    def connect(cls, budget: StoreBudget) -> Store:
        assert isinstance(budget, RemoteBudget)
        return MooncakeStore(budget)
