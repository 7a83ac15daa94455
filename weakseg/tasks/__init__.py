"""Units of work the flows call: plain functions first, thin Prefect task wrappers second."""
