"""`python -m jobs.index --input <embed/classify job output> --output <index URI>`: build a FAISS index.

Reads the ``embedding`` column of the job's Parquet files (local or S3; error rows skipped), chooses the index from
the vector count and ``--max-index-memory``, trains it on a sample, adds the vectors in parallel Ray tasks (one per
file) and merges them, measures recall@10 against exact search, and writes index, id map and metadata atomically.
See search/runner.py for the steps and search/choice.py for the choice of index.
"""

from __future__ import annotations

import argparse

from jobs.search_common import add_common_flags, run
from jobs.shutdown import exit_after
from search.build import RECALL_TARGET
from search.choice import DEFAULT_MAX_INDEX_MEMORY, METRICS, parse_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", required=True, help="output prefix of a classify or embed job (its *.parquet files)")
    parser.add_argument("--output", required=True, help="index URI (a folder, local or s3://...)")
    parser.add_argument("--max-index-memory", type=parse_memory, default=DEFAULT_MAX_INDEX_MEMORY,
                        help="largest index size allowed (bytes, or 4GiB, 512MB, ...): decides how much it is compressed")
    parser.add_argument("--metric", choices=METRICS, default="cosine",
                        help="cosine (vectors normalised), ip (inner product as stored) or l2 (squared distance)")
    parser.add_argument("--recall-queries", type=int, default=500, help="vectors used to measure recall@10")
    parser.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                        help="nprobe is raised until recall@10 reaches this")
    parser.add_argument("--task-cpus", type=float, default=1.0, help="CPUs reserved per Ray task")
    add_common_flags(parser)
    return parser


def _body(args: argparse.Namespace) -> int:
    from search.runner import IndexJobConfig, build_index

    config = IndexJobConfig(
        input=args.input, output=args.output, max_index_memory=args.max_index_memory, metric=args.metric,
        storage_options=args.storage_options, recall_queries=args.recall_queries, recall_target=args.recall_target,
        task_cpus=args.task_cpus,
    )
    record = build_index(config)
    index, recall, source = record["index"], record["recall"], record["input"]
    print(
        f"indexed {source['vectors']} vectors ({source['skipped_rows']} error rows skipped) from "
        f"{len(source['files'])} files: {index['factory']} {index['metric']}, nprobe {index['nprobe']}, "
        f"recall@{recall['k']} {recall['recall_at_k']:.3f}, {record['index_bytes'] / 1e6:.1f} MB, "
        f"{record['build_seconds']:.1f} s -> {args.output}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), _body, argv)


if __name__ == "__main__":
    exit_after(main())
