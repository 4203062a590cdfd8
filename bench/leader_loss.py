#!/usr/bin/env python3
"""Leader loss: kill -9 the holder of the `calls` lease in a lab of real processes and time
until a survivor holds it (from the survivor's own "Lease acquired" log line), restart the
victim, repeat. docs/consensus.md says why it should take about lease + one election.

Usage: bench/leader_loss.py [--trials 20] [--peers 3]

Uses target/release/causeway and 127.0.0.1..N (stop any running lab first). Every process it
starts is stopped by PID; nothing but loopback is touched. The anchor is Patroni with etcd
on this kind of machine (../shared/anchors/patroni/README in ../shared/anchors/README.md):
node loss -> first acknowledged write on the new leader, median 22.2 s at its defaults and
18.8-19.0 s tuned (Patroni will not go below ttl 20)."""
import argparse, os, re, signal, statistics, sys, tempfile, time

ACQUIRED = re.compile(r'^(\S+) .*Event="Lease acquired".*Group="calls"')
PATRONI_S = (18.8, 22.2)  # tuned, default: ../shared/anchors/README.md


# The lab helpers peer_loss.py already has (same binary, same layout).
from peer_loss import BIN, formed, log_ms, pid, sh, start_peer, status, wait


def holder(d, k):
    s = status(d, k)
    for lease in (s or {}).get("leases", []):
        if lease["name"] == "calls":
            return lease["holder"]
    return None


def agreed_holder(d, peers):
    seen = {holder(d, k) for k in peers}
    return seen.pop() if len(seen) == 1 and None not in seen else None


def acquired_at(d, k, after_ms):
    with open(f"{d}/peer{k}/causeway.log") as f:
        for line in f:
            m = ACQUIRED.match(line)
            if m and log_ms(m.group(1)) >= after_ms:
                return log_ms(m.group(1))
    return None


def trials(n, count):
    d = tempfile.mkdtemp(prefix=f"cw-bench-leader-{n}-")
    sh("lab", "up", "--peers", str(n), "--dir", d)
    everyone = list(range(1, n + 1))
    samples = []
    try:
        wait(lambda: agreed_holder(d, everyone), 30, "a lease holder")
        for t in range(count):
            victim = agreed_holder(d, everyone)
            survivors = [k for k in everyone if k != victim]
            t0 = time.time() * 1000
            os.kill(pid(d, victim), signal.SIGKILL)
            found = None
            end = time.time() + 10
            while found is None and time.time() < end:
                times = [x for x in (acquired_at(d, k, t0) for k in survivors) if x is not None]
                found = min(times) if times else None
                time.sleep(0.01)
            if found is None:
                sys.exit(f"trial {t}: no survivor acquired the lease within 10 s")
            samples.append(found - t0)
            print(f"trial {t}: Peer {victim} killed, new holder after {found - t0:.0f} ms", flush=True)
            start_peer(d, victim)
            wait(lambda: formed(d, n), 30, "cluster re-formed")
            wait(lambda: agreed_holder(d, everyone), 10, "every peer agrees on the holder")
            time.sleep(0.5)
    finally:
        sh("lab", "down", "--dir", d)
    return samples


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--trials", type=int, default=20)
    a.add_argument("--peers", type=int, default=3)
    args = a.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}")
    s = trials(args.peers, args.trials)
    med = statistics.median(s)
    print(f"leader loss -> new lease holder (kill -9), {args.peers} peers, {len(s)} trials: "
          f"median {med:.0f} ms  max {max(s):.0f} ms  min {min(s):.0f} ms  mean {statistics.mean(s):.0f} ms")
    tuned, default = PATRONI_S
    print(f"Patroni + etcd anchor (../shared/anchors): median {default} s at defaults, {tuned} s tuned; "
          f"ratio anchor / Causeway median: {default * 1000 / med:.0f}x (defaults), {tuned * 1000 / med:.0f}x (tuned)")


if __name__ == "__main__":
    main()
