"""defectflow: unsupervised visual defect detection for factory lines (library, no Prefect)."""
__version__ = "0.1.0"
