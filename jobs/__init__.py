"""Command lines users run and submit: ``python -m jobs.<name> --help``."""
