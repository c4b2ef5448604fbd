"""Rerun the MoE benchmark: fast vs reference dispatch vs a dense SwiGLU with the same active parameters,
forward+backward, in the four cases of attnlab.bench.moe.CASES (the same as `attnlab bench moe`).

    .venv/bin/python benchmarks/bench_moe.py                      # writes benchmarks/results/moe.md + .png
    .venv/bin/python benchmarks/bench_moe.py --threads 1 --out /tmp/moe   # steadier on a shared machine
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from attnlab.bench.moe import CASES, DTYPES, moe_report, run_moe
from attnlab.bench.peak import measure_peak
from attnlab.bench.results import write_report
from attnlab.device import machine_facts

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32", help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); the results go to moe-threads<N>.md/.png")
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference dispatch")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_peak(dtypes=("fp32",))["fp32"]
    rows = run_moe(cases=CASES, peak_gflops=peak, dtypes=args.dtypes.split(","), repeats=args.repeats,
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
