#!/usr/bin/env bash
# Install rlvr from this checkout and run the quickstart (README, "Quickstart").
#   bash scripts/quickstart.sh                 # forking-token GRPO on the embedded tiny MoE
#   bash scripts/quickstart.sh --arm full      # the full-update baseline, same data and seed
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0 && pip install -e .
rlvr quickstart "$@"
