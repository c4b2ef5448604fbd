#!/usr/bin/env bash
# The nanoGPT CPU race on a char-level corpus (Tiny Shakespeare), side by side in one run:
#
#   benchmarks/race_nanogpt_cpu.sh CORPUS_FILE OUT_DIR [--nanogpt NANOGPT_CHECKOUT] [--rounds N] [--threads N]
#
# attnlab's race recipe (attnlab train --recipe race: the precision and attention kernel this machine
# measured fastest, see `attnlab env`) against nanoGPT's CPU recipe — nanoGPT's own train.py when
# --nanogpt points at a checkout of karpathy/nanoGPT, else attnlab's GPT configured like nanoGPT —
# alternating for N rounds (default 2). Writes OUT_DIR/race.md. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/race_nanogpt_cpu.py "$@"
