#!/usr/bin/env python3
"""Peer-loss detection: kill -9 one peer of a lab cluster, time until alarm 20004 for it is
raised on every survivor (from the survivors' own log timestamps), restart it, repeat.
Then an idle run counting alarms raised in a healthy cluster (false alarms).

Usage: bench/peer_loss.py [--trials 20] [--peers 3,6] [--idle-seconds 600] [--signal KILL|STOP]

--signal KILL: the kernel closes the dead peer's sockets, so survivors see it at once.
--signal STOP: the peer freezes with its sockets open (a hung host, a partition): survivors
find out by heartbeat timeout (800 ms by default); SIGCONT lets it rejoin.
Uses target/release/causeway and 127.0.0.1..N (stop any running lab first). Every process it
starts is stopped by PID; nothing but loopback is touched."""
import argparse, datetime, json, os, re, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "causeway")
RAISED = re.compile(r'^(\S+) \S+ alarm: .*Event="Alarm Raised" Id="20004".*Subject="([^"]+)"')


def sh(*args, **kw):
    return subprocess.run([BIN, *args], check=True, capture_output=True, text=True, **kw)


def status(d, k):
    r = subprocess.run([BIN, "--node", f"{d}/peer{k}", "xstatus", "cluster", "--json"], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def formed(d, n):
    for k in range(1, n + 1):
        s = status(d, k)
        if not s or any(p["clustering"]["state"] not in ("Active", "This system") for p in s["peers"]):
            return False
    return True


def alarms(d, k):
    r = subprocess.run([BIN, "--node", f"{d}/peer{k}", "xstatus", "alarms", "--json"], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def wait(cond, timeout, what):
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def log_ms(stamp):
    return datetime.datetime.fromisoformat(stamp).timestamp() * 1000


def raised_at(d, k, victim, after_ms):
    with open(f"{d}/peer{k}/causeway.log") as f:
        for line in f:
            m = RAISED.match(line)
            if m and m.group(2) == victim and log_ms(m.group(1)) >= after_ms - 5:
                return log_ms(m.group(1))
    return None


def start_peer(d, k):
    log = open(f"{d}/peer{k}/causeway.log", "a")
    p = subprocess.Popen([BIN, "run", "--config", f"{d}/peer{k}/causeway.toml"], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True)
    with open(f"{d}/peer{k}/causeway.pid", "w") as f:
        f.write(f"{p.pid}\n")
    return p


def pid(d, k):
    with open(f"{d}/peer{k}/causeway.pid") as f:
        return int(f.read())


def detection(n, trials, sig):
    d = tempfile.mkdtemp(prefix=f"cw-bench-{n}-")
    sh("lab", "up", "--peers", str(n), "--dir", d)
    samples = []
    try:
        for t in range(trials):
            v = 2 + t % (n - 1)
            victim = f"127.0.0.{v}"
            survivors = [k for k in range(1, n + 1) if k != v]
            t0 = time.time() * 1000
            os.kill(pid(d, v), sig)
            found = {}
            end = time.time() + 5
            while len(found) < len(survivors) and time.time() < end:
                for k in survivors:
                    if k not in found:
                        ts = raised_at(d, k, victim, t0)
                        if ts is not None:
                            found[k] = ts
                time.sleep(0.02)
            if len(found) < len(survivors):
                sys.exit(f"trial {t}: 20004 not raised on every survivor within 5 s: {found}")
            samples.append(max(found.values()) - t0)
            if sig == signal.SIGSTOP:
                os.kill(pid(d, v), signal.SIGCONT)
            else:
                start_peer(d, v)
            wait(lambda: formed(d, n), 30, "cluster re-formed")
            wait(lambda: all(not (alarms(d, k) or {}).get("active") for k in range(1, n + 1)), 10, "alarms lowered")
    finally:
        sh("lab", "down", "--dir", d)
    return samples


def idle(seconds):
    d = tempfile.mkdtemp(prefix="cw-bench-idle-")
    sh("lab", "up", "--peers", "3", "--dir", d)
    try:
        wait(lambda: formed(d, 3), 30, "formed")
        time.sleep(4)  # past the start-up settle window
        before = sum(len((alarms(d, k) or {}).get("events", [])) for k in (1, 2, 3))
        time.sleep(seconds)
        after = sum(len((alarms(d, k) or {}).get("events", [])) for k in (1, 2, 3))
        ok = formed(d, 3)
    finally:
        sh("lab", "down", "--dir", d)
    return after - before, ok


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--trials", type=int, default=20)
    a.add_argument("--peers", default="3,6")
    a.add_argument("--idle-seconds", type=int, default=600)
    a.add_argument("--signal", choices=["KILL", "STOP"], default="KILL")
    args = a.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}")
    for n in [int(x) for x in args.peers.split(",")]:
        s = detection(n, args.trials, getattr(signal, "SIG" + args.signal))
        print(f"peer-loss detection (SIG{args.signal}), {n} peers, {len(s)} trials: p50 {pct(s, 50):.1f} ms  p99 {pct(s, 99):.1f} ms  max {max(s):.1f} ms  mean {statistics.mean(s):.1f} ms")
    if args.idle_seconds:
        events, ok = idle(args.idle_seconds)
        print(f"idle {args.idle_seconds} s, 3 peers: {events} alarm events (false alarms), cluster still formed: {ok}")


if __name__ == "__main__":
    main()
