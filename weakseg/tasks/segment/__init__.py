"""Segment: inputs of a corpus, inference, priors and proposals, the chunk engine, the output tables."""
