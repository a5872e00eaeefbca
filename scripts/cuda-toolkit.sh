#!/usr/bin/env bash
# Assembles a CUDA 11.8 toolkit (CUDA_HOME) for `cargo build --release --features cuda` without
# root, a GPU or changes to /etc/apt: downloads Debian bookworm's non-free CUDA 11.8 packages with a
# private apt configuration (apt checks the Release signature), checks each .deb's sha256 against the
# signed Packages index, extracts them with `dpkg -x` into $CUDA_CACHE (default ~/.cache/cuda-11.8),
# lays out $CUDA_CACHE/cuda (bin/ with nvcc and its own nvcc.profile, include, lib64, lib64/stubs
# with Debian's libcuda.so link stub, nvvm/libdevice) and prints the environment to export.
# nvcc 11.8 accepts gcc <= 11: needs g++-11 (`apt-get install gcc-11 g++-11`, bookworm main).
# Prints the variables to export (eval "$(scripts/cuda-toolkit.sh)"). ~1.2 GB download, 3.7 GB extracted.
set -euo pipefail
CACHE=${CUDA_CACHE:-$HOME/.cache/cuda-11.8}
APT=$CACHE/apt ROOT=$CACHE/root H=$CACHE/cuda
PKGS="nvidia-cuda-toolkit nvidia-cuda-dev libcudart11.0 libnvrtc11.2 libnvrtc-builtins11.8 libnvvm4
      libcublas11 libcublaslt11 libcurand10 libcu++-dev libcub-dev libthrust-dev libnvtoolsext1"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$ROOT"
echo 'deb http://deb.debian.org/debian bookworm main contrib non-free' > "$APT/sources.list"
O=(-o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$APT/lists"
   -o Dir::Cache="$APT/cache" -o APT::Sandbox::User=root)
apt-get "${O[@]}" update >/dev/null
cd "$APT/cache/archives"
# shellcheck disable=SC2086
apt-get "${O[@]}" download $PKGS >/dev/null
for f in *.deb; do
  p=${f%%_*} v=$(dpkg-deb -f "$f" Version)
  want=$(apt-cache "${O[@]}" show "$p=$v" | awk '/^SHA256:/{print $2; exit}')
  echo "$want  $f" | sha256sum -c --quiet - || { echo "sha256 mismatch: $f" >&2; exit 1; }
  dpkg -x "$f" "$ROOT"
done
rm -rf "$H"; mkdir -p "$H/bin" "$H/nvvm"
for b in ptxas fatbinary nvlink cudafe++ bin2c nvprune cuobjdump nvdisasm cu++filt; do
  ln -f "$ROOT/usr/bin/$b" "$H/bin/"; done
# Hard links, not symlinks: nvcc reads nvcc.profile from the directory its executable is in.
ln -f "$ROOT/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$ROOT/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$H/bin/"
cp -rl "$ROOT/usr/lib/nvidia-cuda-toolkit/bin/crt" "$H/bin/"
ln -s ../root/usr/include "$H/include"
ln -s ../root/usr/lib/x86_64-linux-gnu "$H/lib64"
ln -s lib64 "$H/lib"
ln -s ../../root/usr/lib/nvidia-cuda-toolkit/libdevice "$H/nvvm/libdevice"
cat > "$H/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH            += $(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
EOF
# cudaforge (candle-kernels, mistralrs-quant) turns CUDA_COMPUTE_CAP=90 into sm_90a, which nvcc 11.8
# lacks (CUDA 12.0+); this nvcc (used through $NVCC) builds plain sm_90 instead, which H100/H200 run.
W=$CACHE/sm90; rm -rf "$W"; mkdir -p "$W/bin"; ln -s ../cuda/include "$W/include"; ln -s ../cuda/lib64 "$W/lib64"
cat > "$W/bin/nvcc" <<'EOF'
#!/bin/sh
real="$(dirname "$(readlink -f "$0")")/../../cuda/bin/nvcc"
for a; do shift; set -- "$@" "$(printf '%s' "$a" | sed 's/\(compute\|sm\)_90a/\1_90/g')"; done
exec "$real" "$@"
EOF
chmod +x "$W/bin/nvcc"
"$H/bin/nvcc" --version | tail -2 >&2
cat <<EOF
export CUDA_HOME=$H
export PATH=\$CUDA_HOME/bin:\$PATH
export LD_LIBRARY_PATH=\$CUDA_HOME/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export NVCC=$W/bin/nvcc
export NVCC_PREPEND_FLAGS='-ccbin=$(command -v g++-11 || echo /usr/bin/g++-11)'
EOF
