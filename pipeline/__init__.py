"""The Ray Data plan for batch inference: sources -> decode -> inference actors -> Parquet sink."""
