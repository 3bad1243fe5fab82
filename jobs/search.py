"""`python -m jobs.search --index <index URI> -k 10 (--query IMG... | --key KEY... | --query-embeddings URI)`.

Image queries are embedded with the model and preprocessing the index records (refused when ``--model`` names other
weights or preprocessing); keys are looked up in the index and queried with their embeddings; a Parquet of
embeddings is queried row by row. Without ``--output`` the results are printed as a table; with it they are written
as Parquet with columns ``query, rank, key, source, score``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa

from jobs.search_common import add_common_flags, run
from jobs.shutdown import exit_after


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--index", required=True, help="index URI written by python -m jobs.index")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--query", nargs="+", default=[], metavar="IMAGE", help="image files or URIs")
    parser.add_argument("--key", nargs="+", default=[], metavar="KEY", help="keys already in the index")
    parser.add_argument("--query-embeddings", default=None, metavar="URI",
                        help="Parquet file or prefix with an embedding column (and optionally key)")
    parser.add_argument("--output", default=None,
                        help="write Parquet (query, rank, key, source, score) here (a .parquet URI, or a folder that "
                             "gets results.parquet); without it, print a table")
    parser.add_argument("--model", default=None,
                        help="checkpoint for image queries (default: the model URI the index records); its weights "
                             "and preprocessing must match the index's")
    parser.add_argument("--nprobe", type=int, default=None, help="inverted lists probed (default: tuned at build)")
    add_common_flags(parser)
    return parser


def _body(args: argparse.Namespace) -> int:
    from search import build, query, store

    if not (args.query or args.key or args.query_embeddings):
        raise ValueError("give queries: --query IMAGE..., --key KEY... and/or --query-embeddings URI")
    stored = store.load_index(args.index, args.storage_options)
    if args.nprobe:
        build.set_search_params(stored.index, nprobe=args.nprobe)
    names: list[str] = []
    vectors: list[np.ndarray] = []
    if args.query:
        from search.embed import ImageEmbedder

        embedder = ImageEmbedder(stored.metadata["fingerprint"], model_uri=args.model,
                                 storage_options=args.storage_options)
        names.extend(args.query)
        vectors.append(embedder.embed(args.query))
    if args.key:
        found = query.ids_for_keys(stored, args.key)
        names.extend(name for name, _ in found)
        vectors.append(query.vectors_for_ids(stored, [index_id for _, index_id in found], args.storage_options))
    if args.query_embeddings:
        file_names, file_vectors = query.read_query_embeddings(args.query_embeddings, stored, args.storage_options)
        names.extend(file_names)
        vectors.append(file_vectors)
    scores, ids = query.search_vectors(stored, np.concatenate(vectors), args.k)
    table: pa.Table = query.results_table(names, scores, ids, stored)
    if args.output:
        target = store.parquet_target(args.output, "results.parquet")
        store.write_parquet(table, target, args.storage_options)
        print(f"{len(names)} queries, {table.num_rows} results -> {target}")
    else:
        print(query.format_table(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), _body, argv)


if __name__ == "__main__":
    exit_after(main())
