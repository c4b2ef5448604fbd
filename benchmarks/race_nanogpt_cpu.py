"""The nanoGPT CPU race on Tiny Shakespeare (char level), side by side in one run.

    python benchmarks/race_nanogpt_cpu.py CORPUS OUT_DIR [--nanogpt DIR] [--rounds N] [--threads N]

Runs, alternately for ``--rounds`` rounds (so load from other processes hits both alike):
- attnlab's ``race`` recipe (``attnlab train --recipe race``): stops at the first eval whose val loss
  is <= 1.886, what nanoGPT's CPU recipe reaches after 2000 iterations;
- nanoGPT's CPU recipe: nanoGPT itself from a checkout given by ``--nanogpt`` (its README's CPU
  command, run from a scratch copy in OUT_DIR, so the checkout is never written to), or else
  attnlab's GPT configured like nanoGPT (``attnlab train --recipe nanogpt-cpu``).
Each run's wall time is measured from the start of its process. Writes OUT_DIR/race.md (the
table, the ratio, the machine, the commands) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from attnlab.bench.results import markdown_table
from attnlab.device import choose_precision, describe_machine, machine_facts
from attnlab.recipes import RACE_TARGET, recipe

# nanoGPT's README: "python train.py config/train_shakespeare_char.py --device=cpu --compile=False ...".
NANOGPT_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                 "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                 "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_EVAL = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


# Each of the race recipe's changes, undone one at a time (toward nanoGPT's recipe), for --changes.
CHANGES = {
    "3 layers → 4 (nanoGPT's depth)": ["--n-layer", "4"],
    "Muon → AdamW (lr 2e-3)": ["--optimizer", "adamw", "--lr", "2e-3"],
    "AdamW part at 6× Muon's lr → 1× (3.6e-2 → 6e-3)": ["--adamw-lr", "6e-3"],
    "decay to step 275 → 350": ["--max-steps", "350"],
    "warmup 10 → 20 steps": ["--warmup-steps", "20"],
    "RoPE → learned positions": ["--positions", "learned"],
    "RMSNorm → LayerNorm": ["--norm", "layernorm"],
    "SwiGLU → GELU MLP": ["--activation", "gelu"],
    "batch 16 → 12": ["--batch-size", "12"],
    "auto precision → float32": ["--dtype", "float32"],
}


def run_attnlab(recipe: str, corpus: Path, out: Path, threads: list[str], extra: list[str] = ()) -> dict:
    command = [sys.executable, "-m", "attnlab", "train", "--recipe", recipe, "--corpus", str(corpus), "--out", str(out),
               "--overwrite", "--quiet", "--log-interval", "1000000", "--ckpt-interval", "1000000", *threads, *extra]
    wall = _timed(command, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["val_loss"], r["elapsed_s"]) for r in rows if r["val_loss"] is not None]
    return _summary(f"attnlab {recipe}", command, wall, evals, rows[-1]["tokens"] / rows[-1]["step"])


def run_nanogpt(checkout: Path, corpus: Path, out: Path, threads: list[str]) -> dict:
    """nanoGPT's own train.py on the corpus, from a scratch copy of the checkout."""
    work = out / "nanogpt"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(checkout, work, ignore=shutil.ignore_patterns(".git", "out*"))
    data = work / "data" / "shakespeare_char"
    shutil.copy(corpus, data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    env_threads = {"OMP_NUM_THREADS": threads[1]} if threads else {}
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_FLAGS, f"--out_dir={out / 'nanogpt-out'}"]
    log = out / "nanogpt.log"
    wall = _timed(command, work, log, env_threads)
    evals = [(int(m[1]), float(m[3]), None) for m in NANOGPT_EVAL.finditer(log.read_text())]
    return _summary("nanoGPT (its own train.py)", command, wall, evals, 12 * 64)


def _timed(command: list[str], cwd, log: Path | None = None, env: dict | None = None) -> float:
    start = time.monotonic()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        subprocess.run(command, cwd=cwd, check=True, stdout=sink, stderr=subprocess.STDOUT,
                       env={**os.environ, **(env or {})})
    return time.monotonic() - start


def _summary(name: str, command: list[str], wall: float, evals: list, tokens_per_step: float) -> dict:
    hit = next((e for e in evals if e[1] <= RACE_TARGET), None)
    return {"name": name, "command": " ".join(command), "wall_s": wall, "last_val": evals[-1][1], "last_step": evals[-1][0],
            "hit_step": hit[0] if hit else None, "hit_val": hit[1] if hit else None,
            "tokens": (hit[0] if hit else evals[-1][0]) * tokens_per_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--nanogpt", type=Path, default=None, help="a checkout of karpathy/nanoGPT (default: "
                        "attnlab's GPT configured like nanoGPT)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", default=None, help="torch CPU threads for both (default: each one's own choice)")
    parser.add_argument("--changes", action="store_true", help="also run the race recipe with each of its changes "
                        "undone, one at a time, and list each change's effect")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", args.threads] if args.threads else []
    runs = {"attnlab": [], "nanogpt": []}
    for _ in range(args.rounds):
        if args.nanogpt:
            runs["nanogpt"].append(run_nanogpt(args.nanogpt.resolve(), args.corpus.resolve(), args.out, threads))
        else:
            runs["nanogpt"].append(run_attnlab("nanogpt-cpu", args.corpus.resolve(), args.out / "nanogpt-cpu", threads))
        runs["attnlab"].append(run_attnlab("race", args.corpus.resolve(), args.out / "race", threads))
    changes = {name: run_attnlab("race", args.corpus.resolve(), args.out / "change", threads, flags)
               for name, flags in CHANGES.items()} if args.changes else {}
    report = _report(runs, args) + (_changes_report(runs["attnlab"], changes) if changes else "")
    (args.out / "race.md").write_text(report)
    print(report)
    return 0


def _report(runs: dict, args) -> str:
    rows = []
    for name in ("nanogpt", "attnlab"):
        for i, r in enumerate(runs[name]):
            rows.append([f"{r['name']} #{i + 1}", _reached(r), f"{r['tokens'] / 1e6:.2f} M", f"{r['wall_s']:.1f} s",
                         f"{r['last_val']:.4f} at step {r['last_step']}"])
    base = statistics.median(r["wall_s"] for r in runs["nanogpt"])
    ours = statistics.median(r["wall_s"] for r in runs["attnlab"])
    precision = choose_precision("auto")
    lines = [
        f"# The nanoGPT CPU race: wall time to val loss <= {RACE_TARGET}",
        "",
        f"- command: `python benchmarks/race_nanogpt_cpu.py {' '.join(sys.argv[1:])}`",
        f"- machine: {describe_machine(machine_facts())}; {machine_facts()['date']}",
        f"- attnlab's precision here: {precision.dtype} ({precision.reason})",
        f"- {args.rounds} rounds, the two recipes alternating; wall time from each process's start",
        "",
        markdown_table(["run", f"reaches <= {RACE_TARGET}", "tokens", "wall time", "last eval"], rows),
        "",
        f"**Ratio (medians): {ours:.1f} s / {base:.1f} s = {ours / base:.2f}** of nanoGPT's time.",
        "",
        "Commands:",
        "",
        *[f"- `{runs[n][0]['command']}`" for n in ("nanogpt", "attnlab")],
    ]
    return "\n".join(lines) + "\n"


def _changes_report(race: list[dict], changes: dict) -> str:
    """One row per change undone: steps and time to the target against the full recipe's (median)."""
    train = recipe("race").train
    base_wall = statistics.median(r["wall_s"] for r in race)
    rows = [["the race recipe (median of the rounds)", _reached(race[0]), f"{base_wall:.1f} s", "1.00×"]]
    for name, r in changes.items():
        rows.append([name, _reached(r), f"{r['wall_s']:.1f} s",
                     f"{r['wall_s'] / base_wall:.2f}×" if r["hit_step"] else "never reached"])
    return "\n".join([
        "", "## Each change, undone one at a time", "",
        ("The race recipe with one of its changes reverted toward nanoGPT's recipe (same seed, same stop rule: the "
        f"first eval at or below the target, evals every {train['eval_interval']} steps from step "
        f"{train['eval_start']}, at most {train['max_steps']} steps unless the change is the step budget). A change "
        "pays where undoing it costs steps or time."), "",
        markdown_table(["change undone", f"reaches <= {RACE_TARGET}", "wall time", "÷ race recipe"], rows), "",
    ])


def _reached(r: dict) -> str:
    return f"step {r['hit_step']} ({r['hit_val']:.4f})" if r["hit_step"] else f"no ({r['last_val']:.4f} at {r['last_step']})"


if __name__ == "__main__":
    raise SystemExit(main())
