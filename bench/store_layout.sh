#!/usr/bin/env bash
# The replication store's row layout: what one commit of new records costs redb when rows
# are keyed by record key (random AORs, the layout before repl_log) or by seq (repl_log).
# usage: bench/store_layout.sh [EXISTING_ROWS=300000] [BATCH=48] [COMMITS=200]
# Writes only to a temporary directory; prints one line per layout.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -q -p causeway-store --example key_order -- "${1:-300000}" "${2:-48}" "${3:-200}"
