"""Rerun the train benchmark: same as `attnlab bench train [flags]` (results in benchmarks/results/)."""

import sys

from attnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
