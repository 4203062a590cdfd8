#!/usr/bin/env python3
"""Configuration replication on a lab cluster of real processes.

Latency: 1,000 changes written on the primary through its admin socket; for each, the time
from the primary's "System Configuration Changed" log line to the last subordinate's (the
peers' own log timestamps, one clock, millisecond resolution).
Catch-up: one subordinate killed (-9), 10,000 changes written, the subordinate restarted; the
time from its "Node started" line to its "Synchronisation completed successfully" line.

Usage: bench/replication.py [--peers 3,6] [--changes 1000] [--missed 10000]
Uses target/release/causeway and 127.0.0.1..N (stop any running lab first). Every process it
starts is stopped by PID; nothing but loopback is touched."""
import argparse, datetime, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "causeway")
CHANGED = re.compile(r'^(\S+) .*Detail="xconfiguration limits\.calls\.max - changed from: \S+ to: (\d+)"')
STARTED = re.compile(r'^(\S+) .*Detail="Node started"')
SYNCED = re.compile(r'^(\S+) .*Detail="Synchronisation completed successfully".*Stream="config/cluster"')


def sh(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"causeway {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def lab_up(n, d):
    # The previous lab's peers may still be closing their ports: wait for them.
    for _ in range(20):
        r = subprocess.run([BIN, "lab", "up", "--peers", str(n), "--dir", d], capture_output=True, text=True)
        if r.returncode == 0:
            return
        sh("lab", "down", "--dir", d)
        time.sleep(0.5)
    sys.exit(f"lab up failed:\n{r.stdout}{r.stderr}")


def post(sock_path, path, body):
    """One HTTP/1.1 POST over the admin socket; returns (status, json)."""
    data = json.dumps(body).encode()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock_path)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: causeway\r\nConnection: close\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def ms(stamp):
    return datetime.datetime.fromisoformat(stamp).timestamp() * 1000


def log_lines(d, k, pattern):
    with open(f"{d}/peer{k}/causeway.log") as f:
        return [m for m in map(pattern.match, f) if m]


def pid(d, k):
    with open(f"{d}/peer{k}/causeway.pid") as f:
        return int(f.read())


def start_peer(d, k):
    log = open(f"{d}/peer{k}/causeway.log", "a")
    p = subprocess.Popen([BIN, "run", "--config", f"{d}/peer{k}/causeway.toml"], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True)
    with open(f"{d}/peer{k}/causeway.pid", "w") as f:
        f.write(f"{p.pid}\n")


def write(d, changes):
    sock = f"{d}/peer1/admin.sock"
    for i, (path, value) in enumerate(changes):
        status, body = post(sock, "/api/v1/configuration", {"path": path, "value": value})
        if status != 200:
            sys.exit(f"change {i} refused: {status} {body[:200]!r}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def latency(n, changes):
    d = tempfile.mkdtemp(prefix=f"cw-repl-{n}-")
    lab_up(n, d)
    try:
        values = list(range(1, changes + 1))
        t0 = time.time()
        write(d, [("limits.calls.max", str(v)) for v in values])
        elapsed = time.time() - t0
        time.sleep(1)
        at = {k: {} for k in range(1, n + 1)}
        for k in range(1, n + 1):
            for m in log_lines(d, k, CHANGED):
                at[k][int(m.group(2))] = ms(m.group(1))
        samples = []
        for v in values:
            if any(v not in at[k] for k in range(1, n + 1)):
                sys.exit(f"change {v} was not applied on every peer")
            samples.append(max(at[k][v] for k in range(2, n + 1)) - at[1][v])
        return samples, elapsed
    finally:
        sh("lab", "down", "--dir", d)
        if not os.environ.get("KEEP_LAB"):
            shutil.rmtree(d, ignore_errors=True)


def catch_up(missed):
    d = tempfile.mkdtemp(prefix="cw-repl-catchup-")
    lab_up(3, d)
    try:
        os.kill(pid(d, 3), signal.SIGKILL)
        time.sleep(0.5)
        # Distinct keys, so every missed change is a record to send (one key changed 10,000
        # times would travel as one record).
        write(d, [(f"sip.users.user{i}", f"pw{i}") for i in range(1, missed + 1)])
        before = len(log_lines(d, 3, SYNCED))
        start_peer(d, 3)
        end = time.time() + 60
        while len(log_lines(d, 3, SYNCED)) <= before:
            if time.time() > end:
                sys.exit("peer 3 did not catch up within 60 s")
            time.sleep(0.05)
        started = ms(log_lines(d, 3, STARTED)[-1].group(1))
        synced = ms(log_lines(d, 3, SYNCED)[-1].group(1))
        r = subprocess.run([BIN, "--node", f"{d}/peer3", "xconfiguration", "get", "sip.users", "--json"],
                           capture_output=True, text=True)
        held = len(json.loads(r.stdout)) if r.returncode == 0 else 0
        if held != missed:
            sys.exit(f"peer 3 holds {held} users, expected {missed}")
        return synced - started
    finally:
        sh("lab", "down", "--dir", d)
        if not os.environ.get("KEEP_LAB"):
            shutil.rmtree(d, ignore_errors=True)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--peers", default="3,6")
    a.add_argument("--changes", type=int, default=1000)
    a.add_argument("--missed", type=int, default=10000)
    args = a.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}")
    for n in [int(x) for x in args.peers.split(",") if x]:
        s, elapsed = latency(n, args.changes)
        print(f"{n} peers: {len(s)} changes, primary -> every subordinate: p50 {pct(s, 50):.0f} ms, "
              f"p99 {pct(s, 99):.0f} ms, max {max(s):.0f} ms (goal p99 < 100 ms); "
              f"{len(s) / elapsed:.0f} acknowledged changes/s one at a time")
    t = catch_up(args.missed)
    print(f"catch-up: a subordinate that missed {args.missed} changes synchronised {t:.0f} ms after start (goal < 2000 ms)")


if __name__ == "__main__":
    main()
