"""`python -m attnlab` (and `torchrun -m attnlab`) runs the CLI."""

from attnlab.cli import run

run()
