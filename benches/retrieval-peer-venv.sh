#!/usr/bin/env bash
# The Python peer for `benches/retrieval-peer.sh`: bm25s + PyStemmer + numpy + onnxruntime from
# PyPI in their own venv (a measuring stick only; nothing in domainrag depends on them). Prints the
# venv's python. Cached: a rerun takes a second.
set -euo pipefail
VENV="${RETRIEVAL_PEER_VENV:-$HOME/.cache/domainrag/retrieval-peer-venv}"
if ! "$VENV/bin/python" -c 'import bm25s, Stemmer, numpy, onnxruntime, tokenizers' >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    "$VENV/bin/pip" install -q bm25s==0.3.16 PyStemmer==3.1.0 numpy==2.4.6 scipy==1.17.1 \
        onnxruntime==1.32.0 tokenizers==0.23.3 >&2
fi
echo "$VENV/bin/python"
