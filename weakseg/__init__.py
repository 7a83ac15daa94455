"""weakseg: weakly supervised semantic segmentation (Pinheiro & Collobert, CVPR 2015) as a
production data pipeline on Prefect and object storage."""

__version__ = "0.1.0"
