"""What the three search command lines (``jobs.index``, ``jobs.search``, ``jobs.dedup``) share: logging, the
``--storage-options`` flag and the mapping of user errors to exit code 2 with a one-line message.

Exit codes match the inference jobs (``jobs.cli``): 0 done, 2 the command cannot run as asked (input, index, model
or output wrong or refused; ``error: ...`` on stderr naming the URI and the cause, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from model.weights import CheckpointError
from search.errors import SearchError

EXIT_ERROR = 2
USER_ERRORS = (SearchError, CheckpointError, FileNotFoundError, PermissionError)
# Their DEBUG records carry request headers (Authorization, x-amz-security-token) or call arguments (SSE keys).
CREDENTIAL_LOGGERS = ("botocore", "aiobotocore", "s3fs", "urllib3")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-options", type=json.loads, default={},
                        help='fsspec options as JSON, e.g. \'{"anon": true}\'; credentials normally come from AWS_* variables')
    parser.add_argument("--log-level", default="WARNING", help="logging level")


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse, set up logging, run ``body``; user errors become ``error: ...`` and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CREDENTIAL_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.INFO, logger.getEffectiveLevel()))
    try:
        return body(args)
    except ValueError as error:  # settings that cannot work together (memory budget, k, threshold)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
