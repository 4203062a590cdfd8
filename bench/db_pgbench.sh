#!/usr/bin/env bash
# pgbench through the database cluster's three client paths (docs/dbcluster.md sections 6, 13):
#   direct    the master's own PostgreSQL, <master>:5432
#   endpoint  a standby's local endpoint, 127.0.0.K:9899 (bytes forwarded to the master)
#   haproxy   HAProxy (tcp mode) on 127.0.0.1:9898, backends 127.0.0.K:5432 checked with
#             `option httpchk GET /primary` on port 8008 (Patroni's recipe), if haproxy is
#             installed or `apt-get install -y haproxy` works
# each for select-only (-S) and the default TPC-B-like script; prints the TPS of each and the
# ratios endpoint/direct and haproxy/direct (goal >= 0.95).
#
#   bench/db_pgbench.sh [--dir LAB] [-T 20] [-c 8] [-j 2] [-s 10] [--rounds 2] [--no-haproxy]
#
# --dir LAB: use the lab running there (started with `causeway lab up --dir LAB`); without it a
# 3-peer lab is started in a temp dir and stopped at the end. pgbench connects with
# PGSSLMODE=verify-ca and the lab's client certificate (DIR/db/client.crt, client.key, ca.crt),
# user postgres, dbname postgres. Loopback only; every run is capped by `timeout`; HAProxy and
# the lab are stopped by PID on exit, Ctrl-C included. Rounds rotate the order of the paths;
# the TPS shown is the mean over the rounds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/causeway
DIR=""; T=20; C=8; J=2; SCALE=10; ROUNDS=2; HAPROXY=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    -T) T=$2; shift 2 ;;
    -c) C=$2; shift 2 ;;
    -j) J=$2; shift 2 ;;
    -s) SCALE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --no-haproxy) HAPROXY=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$T" -ge 1 ] && [ "$T" -le 600 ] || { echo "-T must be 1..600" >&2; exit 2; }
[ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 10 ] || { echo "--rounds must be 1..10" >&2; exit 2; }
[ -x "$BIN" ] || { echo "$BIN missing: cargo build --release" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench missing (Debian postgresql-client-15)" >&2; exit 1; }

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
WORK=$(mktemp -d /tmp/cw-bench-pgbench-XXXXXX)
chmod 755 "$WORK"   # postgres (the OS user) must reach the lab inside it
OWN_LAB=0; HA_PID=""

cleanup() {
  set +e
  if [ -n "$HA_PID" ] && tr '\0' ' ' <"/proc/$HA_PID/cmdline" 2>/dev/null | grep -q "$WORK/haproxy.cfg"; then
    kill "$HA_PID"; log "haproxy (PID $HA_PID) stopped"
  fi
  if [ "$OWN_LAB" = 1 ]; then
    "$BIN" lab down --dir "$DIR" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

status() { timeout 10 "$BIN" --node "$DIR/peer$1" database cluster --json status 2>/dev/null || true; }

# The master's IP once peer $1's status shows one Connected Master and every other node in sync.
healthy_master() {
  status "$1" | python3 -c '
import json, sys
try: s = json.load(sys.stdin)
except Exception: sys.exit(1)
ns = s.get("nodes") or []
m = [x["address"] for x in ns if x["state"] == "Connected Master"]
ok = len(m) == 1 and all(x["state"] == "Connected Slave ( In Sync )" for x in ns if x["address"] != m[0])
if ok and s.get("node_in_use") == m[0] and len(ns) >= 2: print(m[0])
else: sys.exit(1)'
}

if [ -z "$DIR" ]; then
  for p in 127.0.0.1:4372 127.0.0.1:5432 127.0.0.2:9899 127.0.0.1:9898; do
    ss -ltnH "( sport = :${p##*:} )" | grep -q "${p%:*}:${p##*:}" && { echo "$p in use (a lab running?): use --dir" >&2; exit 1; }
  done
  DIR=$WORK/lab
  OWN_LAB=1
  log "lab up --dir $DIR"
  timeout --foreground 600 "$BIN" lab up --dir "$DIR" >"$WORK/lab-up.log" 2>&1 || { cat "$WORK/lab-up.log" >&2; exit 1; }
fi
DIR=$(cd "$DIR" && pwd)
MASTER=""
for _ in $(seq 1 240); do MASTER=$(healthy_master 1) && break; sleep 0.5; done
[ -n "$MASTER" ] || { echo "the database cluster is not healthy: $(status 1)" >&2; exit 1; }
PEERS=$(status 1 | python3 -c 'import json,sys; print(" ".join(x["address"] for x in json.load(sys.stdin)["nodes"]))')
STANDBY=""
for a in $PEERS; do [ "$a" != "$MASTER" ] && { STANDBY=$a; break; }; done
log "master $MASTER, endpoint on standby $STANDBY, nodes: $PEERS"

export PGSSLMODE=verify-ca PGSSLCERT=$DIR/db/client.crt PGSSLKEY=$DIR/db/client.key PGSSLROOTCERT=$DIR/db/ca.crt
export PGUSER=postgres PGDATABASE=postgres PGCONNECT_TIMEOUT=5

declare -A HOST=([direct]=$MASTER [endpoint]=$STANDBY [haproxy]=127.0.0.1)
declare -A PORT=([direct]=5432 [endpoint]=9899 [haproxy]=9898)
TARGETS=(direct endpoint)

if [ "$HAPROXY" = 1 ]; then
  if ! command -v haproxy >/dev/null; then
    log "installing haproxy"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy; } >"$WORK/apt.log" 2>&1 \
      || log "haproxy could not be installed (see $WORK/apt.log): skipped"
  fi
  if command -v haproxy >/dev/null; then
    {
      printf 'global\n  maxconn 4000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n  timeout check 1s\n\n'
      printf 'frontend pg\n  bind 127.0.0.1:9898\n  default_backend pg_primary\n\n'
      printf 'backend pg_primary\n  option httpchk GET /primary\n  http-check expect status 200\n'
      printf '  default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n'
      for a in $PEERS; do printf '  server db%s %s:5432 check port 8008\n' "${a##*.}" "$a"; done
    } >"$WORK/haproxy.cfg"
    haproxy -c -f "$WORK/haproxy.cfg" >/dev/null
    haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 </dev/null &
    HA_PID=$!
    # wait until its checks have marked the standbys down: writes through it succeed 5 times in a row
    ok=0
    for _ in $(seq 1 40); do
      if [ "$(timeout --foreground 5 psql -h 127.0.0.1 -p 9898 -XAtc 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; then ok=$((ok + 1)); else ok=0; fi
      [ $ok -ge 5 ] && break; sleep 0.5
    done
    [ $ok -ge 5 ] || { echo "haproxy does not lead to the master: $(cat "$WORK/haproxy.log")" >&2; exit 1; }
    sleep 2   # fall 2 x inter 1s: every standby marked down
    TARGETS+=(haproxy)
    log "haproxy $(haproxy -v | head -1 | awk '{print $3}') on 127.0.0.1:9898 (PID $HA_PID)"
  fi
fi

log "pgbench -i -s $SCALE on the master"
timeout --foreground 600 pgbench -h "$MASTER" -p 5432 -i -I dtGvp -s "$SCALE" -q >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; exit 1; }

cpu_ticks() {  # utime+stime of a PID, in clock ticks
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"
}
HZ=$(getconf CLK_TCK)
EP_PID=$(head -1 "$DIR/peer${STANDBY##*.}/causeway.pid")

# the forwarders' own CPU while idle (the causeway process does more than forward), to subtract
IDLE=5
e0=$(cpu_ticks "$EP_PID"); h0=$(cpu_ticks "$HA_PID"); sleep $IDLE; e1=$(cpu_ticks "$EP_PID"); h1=$(cpu_ticks "$HA_PID")
declare -A IDLE_TPS=([endpoint]=$(python3 -c "print(($e1 - $e0) / $IDLE)") [haproxy]=$(python3 -c "print(($h1 - $h0) / $IDLE)") [direct]=0)
log "idle CPU: endpoint's causeway ${IDLE_TPS[endpoint]} ticks/s, haproxy ${IDLE_TPS[haproxy]} ticks/s (HZ $HZ)"

declare -A SUM CNT CPU
for r in $(seq 1 "$ROUNDS"); do
  n=${#TARGETS[@]}
  order=()
  for i in $(seq 0 $((n - 1))); do order+=("${TARGETS[$(((i + r - 1) % n))]}"); done
  for mode in select-only tpcb-like; do
    for tgt in "${order[@]}"; do
      flags=(-n -c "$C" -j "$J" -T "$T")
      [ "$mode" = select-only ] && flags+=(-S)
      case $tgt in endpoint) pid=$EP_PID ;; haproxy) pid=$HA_PID ;; *) pid="" ;; esac
      c0=$(cpu_ticks "$pid")
      out=$WORK/$mode-$tgt-$r.log
      if ! timeout --foreground $((T + 120)) pgbench -h "${HOST[$tgt]}" -p "${PORT[$tgt]}" "${flags[@]}" >"$out" 2>&1; then
        log "pgbench $mode via $tgt failed:"; tail -5 "$out" >&2; exit 1
      fi
      c1=$(cpu_ticks "$pid")
      tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")
      failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
      lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$out")
      [ -n "$tps" ] || { log "no tps in $out"; cat "$out" >&2; exit 1; }
      log "round $r $mode $tgt (${HOST[$tgt]}:${PORT[$tgt]}): tps $tps latency ${lat} ms failed ${failed:-0}"
      k="$mode/$tgt"
      SUM[$k]=$(python3 -c "print(${SUM[$k]:-0} + $tps)")
      CNT[$k]=$(( ${CNT[$k]:-0} + 1 ))
      txn=$(python3 -c "print($tps * $T)")
      CPU[$k]=$(python3 -c "print(${CPU[$k]:-0} + max($c1 - $c0 - ${IDLE_TPS[$tgt]} * $T, 0) / $HZ * 1e6 / max($txn, 1))")
    done
  done
done

echo
echo "pgbench -c $C -j $J -T $T, scale $SCALE, $ROUNDS round(s), master $MASTER, nproc $(nproc), $(date -Is)"
printf '%-12s %-10s %12s %10s %26s\n' mode path tps ratio "forwarder CPU us/txn (*)"
for mode in select-only tpcb-like; do
  d=$(python3 -c "print(${SUM[$mode/direct]} / ${CNT[$mode/direct]})")
  for tgt in "${TARGETS[@]}"; do
    k="$mode/$tgt"
    python3 -c "
t = ${SUM[$k]} / ${CNT[$k]}
cpu = '' if '$tgt' == 'direct' else '%.1f' % (${CPU[$k]} / ${CNT[$k]})
print('%-12s %-10s %12.1f %10.3f %26s' % ('$mode', '$tgt', t, t / $d, cpu))"
  done
done
echo "(*) CPU of the standby's causeway process (endpoint) or of haproxy, above its idle rate, per transaction"
echo "logs: $WORK"
