"""Rerun the attention benchmark: same as `attnlab bench attention [flags]` (results in benchmarks/results/)."""

import sys

from attnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
