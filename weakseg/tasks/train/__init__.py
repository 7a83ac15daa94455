"""Train: reading shards as a stream, augmenting, and the MIL trainer."""
