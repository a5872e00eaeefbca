#!/usr/bin/env bash
# The llama.cpp peer for `domainrag bench engines`: llama-cpp-python built from its PyPI sdist
# (so llama.cpp is compiled for this CPU), in its own venv. A measuring stick only: nothing in
# domainrag depends on it. Prints the venv's python. Cached: a rerun takes a second.
set -euo pipefail
VENV="${LLAMA_CPP_VENV:-$HOME/.cache/domainrag/llama-venv}"
if ! "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    # ~5-10 minutes on 2 cores (compiles llama.cpp with cmake from PyPI).
    "$VENV/bin/pip" install -q --no-binary llama-cpp-python llama-cpp-python==0.3.36 >&2
fi
echo "$VENV/bin/python"
