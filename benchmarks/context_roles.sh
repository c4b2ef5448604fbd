#!/usr/bin/env bash
# The committed results of `attnlab context` (MiniLM, SmolLM2: the "bank" and "cool" tables) and
# `attnlab roles` (SmolLM2: its previous-token, duplicate-token and induction heads):
#
#   benchmarks/context_roles.sh [OUT_DIR]     (default: benchmarks/results)
#
# Each run writes OUT_DIR/<name>/ (the command's report.md/json or roles.md/json and PNGs) plus run.md:
# the exact command, this machine (lscpu model, cores, torch's CPU capability), the torch version,
# the date, the wall time and the command's terminal output. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
python=${PYTHON:-.venv/bin/python}

run() {
    local name=$1
    shift
    local dir="$out/$name"
    mkdir -p "$dir"
    local start end
    start=$(date +%s.%N)
    "$python" -m attnlab "$@" --out "$dir" --overwrite > "$dir/stdout.txt"
    end=$(date +%s.%N)
    {
        echo "# attnlab $1 ($name)"
        echo
        echo "- command: \`attnlab $* --out $dir\`"
        echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores visible," \
             "torch CPU capability $("$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
        echo "- torch $("$python" -c 'import torch; print(torch.__version__)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- wall time of the whole command (model load included): $(echo "$end - $start" | bc | xargs printf '%.1f') s"
        echo
        echo '```'
        grep -v '^wrote ' "$dir/stdout.txt"
        echo '```'
    } > "$dir/run.md"
    rm "$dir/stdout.txt"
    echo "wrote $dir"
}

run context_minilm context --model minilm
run context_smollm2 context --model smollm2
run roles_smollm2 roles --model smollm2
