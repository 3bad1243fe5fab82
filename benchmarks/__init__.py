"""Benchmarks: the measurements behind the README's performance figures, kept out of the runtime packages.

``jobs.benchmark`` is the command line; each module here measures one stage or holds the arithmetic the reports
share (:mod:`benchmarks.measures`).
"""
