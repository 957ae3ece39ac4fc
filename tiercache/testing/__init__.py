"""Contract suites a tier, an eviction rule or a placement rule must pass, for this project and for third parties,
the way `zarr.testing` serves stores: subclass the contract in a pytest module and say what to build.

    from tiercache.testing import TierContract

    class TestMyTier(TierContract):
        tier_type = MyTier

Needs pytest (and hypothesis for the eviction contract's property tests).
"""

from .policies import EvictionContract, PlacementContract
from .tiers import TierContract

__all__ = ["EvictionContract", "PlacementContract", "TierContract"]
