"""Errors of the search layer. Each message names the URI (input, index, model), the cause and what to do."""

from __future__ import annotations


class SearchError(RuntimeError):
    """Base class: something the user can fix (the CLIs print the message, no traceback, and exit with 2)."""


class EmbeddingInputError(SearchError):
    """The embedding job's output cannot be indexed: no data files, no embeddings (empty or all error rows), no
    ``embedding`` column, or files written by different models or preprocessing."""


class FingerprintMismatchError(SearchError):
    """A query (image model, embeddings file) was made with another model, preprocessing or width than the index."""


class IndexStoreError(SearchError):
    """No complete index under a URI, or one written by an incompatible version of this code."""
