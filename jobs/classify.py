"""`python -m jobs.classify --help`: classification job over image shards; see jobs/cli.py for the flags."""

from jobs.cli import main
from jobs.shutdown import exit_after

if __name__ == "__main__":
    exit_after(main("classify"))
