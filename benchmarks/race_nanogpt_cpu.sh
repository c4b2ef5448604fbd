#!/usr/bin/env bash
# The nanoGPT CPU race on a char-level corpus (Tiny Shakespeare).
#
#   benchmarks/race_nanogpt_cpu.sh CORPUS_FILE OUT_DIR [RECIPE]
#
# RECIPE "race" (default) trains attnlab's race recipe and stops at the first eval whose val loss
# is <= 1.886 (what nanoGPT's CPU recipe reaches after 2000 iterations); RECIPE "nanogpt-cpu"
# trains nanoGPT's CPU recipe itself (4 layers, 4 heads, 128 dims, block 64, batch 12, lr 1e-3,
# 2000 iterations, dropout 0, fp32) with attnlab's GPT configured like nanoGPT's. The recipes live
# in attnlab.recipes (`attnlab train --help` lists them); the race recipe takes the precision and
# attention kernel this machine measured fastest (`attnlab env` shows them).
# Both judge val loss as nanoGPT does: mean cross-entropy over every position of 20 x 12 random
# 64-character windows of the val split (the last 10% of the text). OUT_DIR/metrics.jsonl gets one
# row per eval; elapsed_s counts from the start of the Python process. THREADS=N sets torch's
# CPU threads (default: measured); PYTHON overrides the interpreter (default: .venv/bin/python).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CORPUS_FILE OUT_DIR [race|nanogpt-cpu]" >&2
    exit 2
fi
corpus=$(realpath "$1")
out=$(realpath -m "$2")
recipe=${3:-race}
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi

"$python" -m attnlab train --recipe "$recipe" --corpus "$corpus" --out "$out" --overwrite --quiet \
    --log-interval 1000000 --ckpt-interval 1000000 "${threads[@]}"

"$python" - "$out/metrics.jsonl" <<'PY'
import json, sys
from attnlab.recipes import RACE_TARGET
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
evals = [r for r in rows if r["val_loss"] is not None]
hit = next((r for r in evals if r["val_loss"] <= RACE_TARGET), None)
last = evals[-1]
if hit:
    print(f"val loss {hit['val_loss']:.4f} <= {RACE_TARGET} at step {hit['step']}, {hit['elapsed_s']:.1f} s from process start")
else:
    print(f"val loss never reached {RACE_TARGET}")
print(f"last eval: step {last['step']}, val loss {last['val_loss']:.4f}, {last['elapsed_s']:.1f} s")
PY
