"""The Ray Data plan for batch inference: sources -> decode -> inference actors -> Parquet sink."""

__version__ = "0.1.0"
