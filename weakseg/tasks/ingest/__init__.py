"""Ingest: listing sources, mapping labels, writing WebDataset shards and their manifest."""
