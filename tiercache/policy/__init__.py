"""How a cache decides: the policy schema, placement and eviction rules, and the pathway cost model."""
