"""Evaluate: scoring against VOC-layout ground truth, choosing thresholds, comparing prior variants."""
