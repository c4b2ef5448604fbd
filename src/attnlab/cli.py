"""The `attnlab` command line: parses flags, calls library functions, prints results.

Each subcommand is a ``_cmd_<name>(args) -> int`` plus a ``_add_<name>(subparsers)`` that
declares its flags. A user mistake (``attnlab.errors.UserError``, bad flags) is printed as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from attnlab.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_explain(sub) -> None:
    from attnlab.explain import STEPS

    p = sub.add_parser(
        "explain",
        help="walk through the lecture's attention path with real numbers",
        description="The lecture's attention path, one new idea per step, with every intermediate tensor.",
    )
    p.add_argument("--step", default="all", choices=["all", *STEPS], help="one step, or all in order (default)")
    p.add_argument("--seed", type=int, default=123, help="torch seed for the trainable weights (lecture: 123)")
    p.add_argument("--format", dest="fmt", default="text", choices=["text", "md"], help="terminal text or Markdown")
    p.add_argument("--out", default=None, help="write to this file instead of the terminal (refuses to overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args) -> int:
    from attnlab.explain import explain

    text = explain(step=args.step, seed=args.seed, fmt=args.fmt, out=args.out, overwrite=args.overwrite,
                   styles=args.out is None and sys.stdout.isatty())
    if args.out is not None:
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


_COMMANDS = [_add_explain]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlab", description="LLM attention: see it, prove it, compare it, train it.")
    from attnlab import __version__

    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        message = " ".join(str(err).split())
        print(f"attnlab {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnlab {args.command}: interrupted", file=sys.stderr)
        return 130
