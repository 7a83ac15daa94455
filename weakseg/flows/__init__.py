"""Prefect flows (deployment entrypoints) and the ``weakseg`` command line."""
