"""Rerun the peak benchmark: same as `attnlab bench peak [flags]` (results in benchmarks/results/)."""

import sys

from attnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "peak", *sys.argv[1:]]))
