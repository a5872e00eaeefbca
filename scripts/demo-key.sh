#!/usr/bin/env bash
# The demo's admin key: made once per data dir (auth is on by default) and kept in
# $DATA_DIR/demo-admin.key (mode 600) so that a second `make demo` prints the same key; then how to
# use it. Revoke it with `domainrag keys revoke ID` and delete the file when the demo is over.
# Usage: scripts/demo-key.sh BIN DATA_DIR
set -euo pipefail
BIN=$1
DATA_DIR=$2
FILE="$DATA_DIR/demo-admin.key"
if [ ! -s "$FILE" ]; then
  umask 077
  mkdir -p "$DATA_DIR"
  "$BIN" --data-dir "$DATA_DIR" keys create --admin --name demo > "$FILE"
fi
KEY=$(cat "$FILE")
cat <<MSG
demo admin key (also in $FILE): $KEY
  web UI:  paste it under "API key" at http://127.0.0.1:8080
  curl:    curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/api/collections
  openai:  OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="$KEY")
  a team:  domainrag keys create --collection postgres --role reader --name support-team
MSG
