#!/usr/bin/env bash
# The Hugging Face peer for `benches/train-vs-peft.sh`: torch + transformers + peft from PyPI in
# their own venv (a measuring stick only; nothing in domainrag depends on them). Prints the venv's
# python. Cached: a rerun takes a second.
set -euo pipefail
VENV="${PEFT_VENV:-$HOME/.cache/domainrag/peft-venv}"
if ! "$VENV/bin/python" -c 'import peft, transformers, torch' >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    "$VENV/bin/pip" install -q torch==2.15.0 transformers==5.24.0 peft==0.21.2 >&2
fi
echo "$VENV/bin/python"
