#!/usr/bin/env bash
# The llama.cpp peer for `domainrag bench engines`: llama-cpp-python built from its PyPI sdist
# (so llama.cpp is compiled for this CPU), in its own venv. A measuring stick only: nothing in
# domainrag depends on it. Prints the venv's python. Cached: a rerun takes a second.
set -euo pipefail
VENV="${LLAMA_CPP_VENV:-$HOME/.cache/domainrag/llama-venv}"
# The instruction sets /proc/cpuinfo lists, named to ggml one by one, never AMX: with
# GGML_NATIVE (-march=native) ggml used AMX tiles on a VM that lists amx_tile/amx_int8 but does
# not run them, and died with SIGILL (`tileloadd`) on its first prompt longer than a few tokens.
cpu_flags() {
    local flags args=(-DGGML_NATIVE=OFF)
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    local pair
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
        avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then args+=("-DGGML_${pair##*:}=ON"); fi
    done
    echo "${args[*]}"
}
if ! "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    # ~5-10 minutes on 2 cores (compiles llama.cpp with cmake from PyPI).
    CMAKE_ARGS="$(cpu_flags)" "$VENV/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python \
        llama-cpp-python==0.3.36 >&2
fi
echo "$VENV/bin/python"
