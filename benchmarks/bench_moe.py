"""Rerun the MoE benchmark: fast vs reference dispatch vs a dense SwiGLU with the same active parameters.

    .venv/bin/python benchmarks/bench_moe.py            # the issue's sizes, writes benchmarks/results/moe.md + .png
    .venv/bin/python benchmarks/bench_moe.py --tokens 512 --repeats 2 --out /tmp/moe   # a quick check
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from attnlab.device import machine_facts
from attnlab.bench.moe import DTYPES, PASSES, moe_report, run_moe
from attnlab.bench.results import write_report

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=64, help="n_routed_experts")
    p.add_argument("--top-k", type=int, default=6, help="n_activated_experts")
    p.add_argument("--shared", type=int, default=2, help="n_shared_experts")
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--passes", default="forward+backward", help=f"comma-separated, from {', '.join(PASSES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); the results go to moe-threads<N>.md/.png")
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference dispatch")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = dict(d_model=args.d_model, n_routed_experts=args.experts, n_activated_experts=args.top_k,
                 n_shared_experts=args.shared, expert_hidden=args.expert_hidden, tokens=args.tokens)
    rows = run_moe(**sizes, passes=args.passes.split(","), dtypes=args.dtypes.split(","), repeats=args.repeats,
                   warmup=args.warmup, reference=not args.no_reference,
                   progress=lambda message: print(f"… {message}", file=sys.stderr))
    report = moe_report(rows)
    if args.threads:
        report.mode = f"moe-threads{args.threads}"
    command = shlex.join([".venv/bin/python", "benchmarks/bench_moe.py", *(argv if argv is not None else sys.argv[1:])])
    paths = write_report(report, args.out, command=command, machine=machine_facts())
    print(paths[0].read_text())
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
