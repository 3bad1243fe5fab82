"""From embeddings to search: build, query and deduplicate a FAISS index over an embed/classify job's Parquet output.

Modules, one concern each (data flows jobs -> search -> pipeline/model):

* :mod:`search.errors`      typed errors of this layer (messages name the URI, the cause and the fix)
* :mod:`search.embeddings`  reading the job's output: data files, the embedding column, the model fingerprint
* :mod:`search.choice`      which FAISS index for a vector count and a memory budget (pure)
* :mod:`search.build`       FAISS compute: train, add, merge, exact top-k, recall, nprobe tuning (pure, no I/O)
* :mod:`search.store`       the index layout under an output URI, written atomically, and loading it back
* :mod:`search.runner`      the build job: Ray tasks over the Parquet files, then merge and write
* :mod:`search.query`       queries by vector, key or Parquet of embeddings -> (query, rank, key, source, score)
* :mod:`search.embed`       queries by image: decode + embed with the model and preprocessing the index records
* :mod:`search.dedup`       near-duplicate groups by range search

FAISS is the field's standard library for this (exact, inverted-file, product-quantised and graph indexes, with
training, merging and range search); nothing here is a hand-written index.
"""
