"""Rerun the decode benchmark: same as `attnlab bench decode [flags]` (results in benchmarks/results/)."""

import sys

from attnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
