#!/usr/bin/env bash
# Test-only tools, cached: a Python venv with the real `openai` client (the OpenAI-compatibility
# test drives the server with it) and schemathesis (the API fuzz test runs it against
# /openapi.json), and, for the browser test, Debian's chromium plus playwright-core
# from npm. Idempotent; a rerun with everything present takes a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DOMAINRAG_CACHE:-$HOME/.cache/domainrag}
VENV=$CACHE/test-venv
OPENAI_VERSION=3.57.0
SCHEMATHESIS_VERSION=4.32.5

if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "test-deps: python venv with openai==$OPENAI_VERSION -> $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --only-binary :all: "openai==$OPENAI_VERSION"
fi
if [ "$("$VENV/bin/st" --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
  echo "test-deps: schemathesis==$SCHEMATHESIS_VERSION -> $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

if [ -f "$ROOT/tests/web/package.json" ]; then
  if [ ! -x /usr/bin/chromium ]; then
    echo "test-deps: installing Debian chromium"
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  fi
  if [ ! -d "$ROOT/tests/web/node_modules/playwright-core" ]; then
    echo "test-deps: npm ci in tests/web"
    (cd "$ROOT/tests/web" && npm ci --no-audit --no-fund --silent)
  fi
fi
echo "test-deps: ready"
