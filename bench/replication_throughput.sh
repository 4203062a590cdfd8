#!/bin/sh
# Replication engine throughput: three engines in one process on durable redb files,
# linked in-process (no TLS, no HTTP): one writer, batches, and 16/64/256 concurrent writers.
# Usage: bench/replication_throughput.sh
set -eu
cd "$(dirname "$0")/.."
cargo build --release -q -p causeway-replication --example throughput
echo "machine: $(nproc) cores, $(uname -r)"
target/release/examples/throughput
for w in 16 256; do
    CONCURRENT_ONLY=1 WRITERS=$w target/release/examples/throughput
done
