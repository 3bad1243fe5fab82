"""`python -m jobs.embed --help`: embed job over image shards; see jobs/cli.py for the flags."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main("embed"))
