"""`python -m jobs.dedup --index <index URI> --threshold T --output <URI>`: near-duplicate groups as Parquet.

Range search of every indexed vector against the index, exact verification of each candidate pair, and greedy groups
around representatives (see search/dedup.py). Writes ``key, source, group, score`` (score against the group's
representative: cosine similarity >= T for cosine indexes, squared distance <= T for l2) for every member of a group
of two or more.
"""

from __future__ import annotations

import argparse

from jobs.search_common import add_common_flags, run
from jobs.shutdown import exit_after


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.dedup", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--index", required=True, help="index URI written by python -m jobs.index")
    parser.add_argument("--threshold", type=float, required=True,
                        help="cosine/ip: minimum similarity (e.g. 0.95); l2: maximum squared distance")
    parser.add_argument("--output", required=True,
                        help="Parquet URI (.parquet) or folder (gets duplicates.parquet), local or s3://")
    add_common_flags(parser)
    return parser


def _body(args: argparse.Namespace) -> int:
    from search import dedup, store

    stored = store.load_index(args.index, args.storage_options)
    table = dedup.near_duplicate_groups(stored, args.threshold, args.storage_options)
    target = store.parquet_target(args.output, "duplicates.parquet")
    store.write_parquet(table, target, args.storage_options)
    groups = len(set(table.column("group").to_pylist()))
    print(f"{groups} near-duplicate groups, {table.num_rows} images, threshold {args.threshold} -> {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), _body, argv)


if __name__ == "__main__":
    exit_after(main())
