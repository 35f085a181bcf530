"""Model registry (MLflow on local SQLite), provenance and the champion / challenger gate."""
