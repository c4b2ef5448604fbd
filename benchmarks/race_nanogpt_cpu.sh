#!/usr/bin/env bash
# The nanoGPT CPU race on a char-level corpus (Tiny Shakespeare).
#
#   benchmarks/race_nanogpt_cpu.sh CORPUS_FILE OUT_DIR [RECIPE]
#
# RECIPE "attnlab" (default) trains attnlab's fast recipe and stops at the first eval whose val
# loss is <= 1.886 (what nanoGPT's CPU recipe reaches after 2000 iterations); RECIPE "nanogpt"
# trains nanoGPT's CPU recipe itself (4 layers, 4 heads, 128 dims, block 64, batch 12, lr 1e-3,
# 2000 iterations, dropout 0, fp32) with attnlab's GPT configured like nanoGPT's.
# Both judge val loss as nanoGPT does: mean cross-entropy over every position of 20 x 12 random
# 64-character windows of the val split (the last 10% of the text). OUT_DIR/metrics.jsonl gets one
# row per eval; elapsed_s counts from the start of the Python process. THREADS=N sets torch's
# CPU threads (default: torch's choice); PYTHON overrides the interpreter (default: .venv/bin/python).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CORPUS_FILE OUT_DIR [attnlab|nanogpt]" >&2
    exit 2
fi
corpus=$(realpath "$1")
out=$(realpath -m "$2")
recipe=${3:-attnlab}
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
target=1.886

judge=(--eval-iters 20 --eval-batch-size 12 --eval-block-size 64 --ckpt-interval 1000000)
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi

case "$recipe" in
    attnlab)
        # Llama-style blocks (RoPE, RMSNorm, SwiGLU) learn faster per token than nanoGPT's; bf16 autocast
        # with the explicit attention kernel (faster than CPU flash attention in bf16); 3x nanoGPT's
        # learning rate, short warmup, and a cosine decay that ends just after the expected crossing.
        # Each eval scores 15k tokens, so the race evaluates every 25 steps only from step 450 on.
        recipe_flags=(--n-layer 4 --n-head 4 --d-model 128 --block-size 64 --batch-size 16 --lr 3e-3
                      --min-lr 2e-4 --warmup-steps 20 --max-steps 650 --eval-interval 25 --eval-start 450
                      --attention mha --positions rope --norm rmsnorm --activation swiglu --dropout 0
                      --dtype bfloat16 --attention-kernel explicit --target-val-loss "$target") ;;
    nanogpt)
        recipe_flags=(--n-layer 4 --n-head 4 --d-model 128 --block-size 64 --batch-size 12 --lr 1e-3
                      --min-lr 1e-4 --warmup-steps 100 --max-steps 2000 --decay-steps 2000 --eval-interval 250
                      --attention mha --positions learned --norm layernorm --activation gelu --dropout 0
                      --dtype float32 --attention-kernel fused) ;;
    *)
        echo "$0: RECIPE must be attnlab or nanogpt, got '$recipe'" >&2
        exit 2 ;;
esac

"$python" -m attnlab train --corpus "$corpus" --out "$out" --overwrite --quiet --log-interval 1000000 \
    "${judge[@]}" "${threads[@]}" "${recipe_flags[@]}"

"$python" - "$out/metrics.jsonl" "$target" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
evals = [r for r in rows if r["val_loss"] is not None]
hit = next((r for r in evals if r["val_loss"] <= float(sys.argv[2])), None)
last = evals[-1]
if hit:
    print(f"val loss {hit['val_loss']:.4f} <= {sys.argv[2]} at step {hit['step']}, {hit['elapsed_s']:.1f} s from process start")
else:
    print(f"val loss never reached {sys.argv[2]}")
print(f"last eval: step {last['step']}, val loss {last['val_loss']:.4f}, {last['elapsed_s']:.1f} s")
PY
