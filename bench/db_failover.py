#!/usr/bin/env python3
"""Database cluster failover: node loss -> first acknowledged write on the new master, and
acknowledged writes lost, for a lab of real processes (docs/dbcluster.md sections 11-13).

Usage: bench/db_failover.py [--trials 10] [--peers 3] [--dir DIR] [--out results.json]
                            [--paths endpoint,multihost] [--with-anchor]

The model is the Patroni anchor (../shared/anchors/patroni/): its writer.py is imported and
run unchanged (a write every 20 ms on one autocommit connection, reconnecting after any
error; each acknowledged INSERT recorded with a monotonic time and the time its connection
was opened), only its DSN is ours (client certificates, sslmode=verify-ca) and the node it
reached is recorded by host, since every node listens on port 5432. A trial: the cluster is
healthy (one Connected Master, every other node Connected Slave ( In Sync ), on every node's
status) -> writer started in this process (one clock) -> warm-up + a random phase (uniform
0..--jitter s, the lease is 1 s) -> SIGKILL of the master's causeway process, its postmaster
and every postmaster child in one burst -> the time to the first acknowledged INSERT on a
connection opened after the kill -> the killed peer is restarted (as `causeway run`, its PID
written to DIR/peerK/causeway.pid) -> healthy again -> 1 s more of writes -> every
acknowledged row of the trial must be on the master (and, at the end, on every node).

Two client paths, trials interleaved: "endpoint" (a surviving node's local endpoint,
127.0.0.K:9899, no target_session_attrs, so the endpoint alone must lead to the master) and
"multihost" (libpq host=127.0.0.1,...,127.0.0.N port=5432 target_session_attrs=read-write,
the anchor's own DSN shape).

Uses target/release/causeway, psycopg2 (pip install psycopg2-binary) and 127.0.0.1..N
(nothing else may run a lab there). Every process it starts is stopped by PID (`lab down`,
also on Ctrl-C and on errors); nothing but loopback is touched. Every loop is bounded in
count and time. A trial that loses an acknowledged write, never fails over or never becomes
healthy again leaves a copy of the lab directory under /tmp/dbbench-evidence/.

--wait-checkpoint: before the killed peer is restarted, wait until the new master has
completed its first checkpoint on its new timeline. Without it (the anchor's way: restart at
once) a peer that pg_rewinds against a master promoted a second ago can be left unable to
start (pg_rewind reads the master's pg_control, whose checkpoint is still on the old
timeline), and the cluster never becomes healthy again: the benchmark then stops with the
evidence kept.

--with-anchor also runs the Patroni anchor's run.sh (node kill, synchronous_mode on, the
same number of trials, defaults and tuned) after this lab is down, but only when what it
needs is already installed (etcd, and its venv with patroni): this script installs nothing.
Otherwise it says so and the comparison uses the anchor's recorded figures
(../shared/anchors/README.md: median 22.2 s at Patroni's defaults, 18.8-19.0 s tuned)."""
import argparse
import datetime
import fcntl
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.dont_write_bytecode = True
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "causeway")
ANCHOR_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "anchors", "patroni"))
EVIDENCE = "/tmp/dbbench-evidence"
LOCK = "/tmp/causeway-lab.lock"
# ../shared/anchors/README.md, patroni row (measured 2026-11-22 on this kind of machine).
ANCHOR_RECORDED = {"default_median_s": 22.2, "tuned_median_s": (18.8, 19.0),
                   "lost": "0 acknowledged writes lost in 40 trials",
                   "rejoin_s": (5.7, 16.0)}
IN_SYNC = "Connected Slave ( In Sync )"
MASTER = "Connected Master"

try:
    import psycopg2
except ImportError:
    sys.exit("db_failover.py needs psycopg2: pip install psycopg2-binary")

sys.path.insert(0, ANCHOR_DIR)
try:
    import writer as anchor_writer  # the anchor's writer.py, unchanged
except ImportError:
    sys.exit(f"the Patroni anchor's writer.py is not in {ANCHOR_DIR}")


def log(msg):
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the lab

def sh(*args, timeout=300, check=True):
    r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"causeway {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def db_status(d, k):
    try:
        r = subprocess.run([BIN, "--node", f"{d}/peer{k}", "database", "cluster", "--json", "status"],
                           capture_output=True, text=True, timeout=5)
        return json.loads(r.stdout) if r.returncode == 0 else None
    except Exception:
        return None


def healthy_view(s, n):
    """The master's IP when this status shows n nodes: one Connected Master (= node_in_use),
    every other node Connected Slave ( In Sync )."""
    if not s or s.get("status") != "Enabled":
        return None
    nodes = s.get("nodes") or []
    masters = [x["address"] for x in nodes if x.get("state") == MASTER]
    synced = [x for x in nodes if x.get("state") == IN_SYNC]
    if len(nodes) != n or len(masters) != 1 or len(synced) != n - 1:
        return None
    return masters[0] if s.get("node_in_use") == masters[0] else None


def healthy(d, n, peers):
    """The master's IP when every given peer's status agrees the cluster is healthy."""
    seen = {healthy_view(db_status(d, k), n) for k in peers}
    return seen.pop() if len(seen) == 1 and None not in seen else None


def wait_for(cond, timeout, interval=0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    return None


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.readline().strip())
    except Exception:
        return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except Exception:
        return ""


def children(pid):
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                st = f.read()
            if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(e))
        except Exception:
            pass
    return out


def start_peer(d, k):
    logf = open(f"{d}/peer{k}/causeway.log", "a")
    p = subprocess.Popen([BIN, "run", "--config", f"{d}/peer{k}/causeway.toml"], stdin=subprocess.DEVNULL,
                         stdout=logf, stderr=logf, start_new_session=True)
    logf.close()
    with open(f"{d}/peer{k}/causeway.pid", "w") as f:
        f.write(f"{p.pid}\n")
    return p


def http_status(host, path, timeout=0.3):
    try:
        with urllib.request.urlopen(f"http://{host}:8008{path}", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def ports_busy(n):
    r = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True)
    busy = []
    for k in range(1, n + 1):
        for port in (4372, 5432, 9899, 8008):
            if re.search(rf"\s127\.0\.0\.{k}:{port}\s", r.stdout + " "):
                busy.append(f"127.0.0.{k}:{port}")
    return busy


def stray_postmasters(d, n):
    """Postmasters of this lab still running after `lab down` (they follow their causeway by
    PR_SET_PDEATHSIG; this is only a safety net): SIGQUIT, then SIGKILL."""
    left = []
    for k in range(1, n + 1):
        for sub in ("cluster", "local"):
            data = f"{d}/peer{k}/db/{sub}"
            pm = read_pid(f"{data}/postmaster.pid")
            if pm and "postgres" in cmdline(pm) and data in cmdline(pm):
                left.append((pm, data))
    for pm, data in left:
        log(f"postmaster {pm} ({data}) still running after lab down: SIGQUIT")
        try:
            os.kill(pm, signal.SIGQUIT)
        except ProcessLookupError:
            continue
        for _ in range(50):
            if not os.path.exists(f"/proc/{pm}"):
                break
            time.sleep(0.1)
        else:
            if data in cmdline(pm):
                os.kill(pm, signal.SIGKILL)
    return left


def keep_evidence(d, label, notes):
    os.makedirs(EVIDENCE, exist_ok=True)
    dst = os.path.join(EVIDENCE, f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{label}")

    def ignore(src, names):
        return [x for x in names if x.endswith(".sock") or x.startswith(".s.PGSQL")]
    try:
        shutil.copytree(d, dst, ignore=ignore, symlinks=True, ignore_dangling_symlinks=True)
    except shutil.Error:
        pass  # files that vanished while copying a running lab
    with open(os.path.join(dst, "BENCH-NOTES.json"), "w") as f:
        json.dump(notes, f, indent=1, default=str)
    log(f"evidence kept in {dst}")
    return dst


def dbcluster_log_lines(d, k, offset, limit=60):
    try:
        with open(f"{d}/peer{k}/causeway.log", errors="replace") as f:
            f.seek(offset)
            lines = [x.rstrip() for x in f if 'Module="developer.dbcluster"' in x]
        return lines[-limit:]
    except Exception:
        return []


def log_size(d, k):
    try:
        return os.path.getsize(f"{d}/peer{k}/causeway.log")
    except OSError:
        return 0


PROMOTE = re.compile(r'^(\S+) .*Module="developer\.dbcluster".*Event="Database action" Action="promote"')


def promoted_at(d, k, offset):
    """Wall-clock time (s) of the first promote action logged by peer k after offset."""
    for line in dbcluster_log_lines(d, k, offset, limit=10000):
        m = PROMOTE.match(line)
        if m:
            try:
                return datetime.datetime.fromisoformat(m.group(1)).timestamp()
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------- the writer

def dsn(d, hosts, port, read_write):
    s = (f"host={','.join(hosts)} port={port} dbname=postgres user=postgres sslmode=verify-ca "
         f"sslcert={d}/db/client.crt sslkey={d}/db/client.key sslrootcert={d}/db/ca.crt "
         f"connect_timeout=2 keepalives=1 keepalives_idle=1 keepalives_interval=1 keepalives_count=2 "
         f"application_name=bench_writer")
    return s + (" target_session_attrs=read-write" if read_write else "")


class Writer(anchor_writer.Writer):
    """The anchor's Writer (its run loop unchanged) with our DSN; a connection's node is its
    host (every node listens on 5432), recorded where the anchor records the port."""

    def __init__(self, the_dsn, trial, interval, duration):
        super().__init__([5432], trial, interval=interval, duration=duration)
        self.dsn = the_dsn

    def _connect(self):
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        t = time.monotonic()
        host = conn.info.host
        with self.lock:
            self.conns.append((t, host))
        return conn, t, host


def master_conn(d, n):
    c = psycopg2.connect(dsn(d, [f"127.0.0.{k}" for k in range(1, n + 1)], 5432, True))
    c.autocommit = True
    return c


def new_tli_checkpointed(d, n):
    """Whether the master's last checkpoint is on its current timeline."""
    try:
        c = master_conn(d, n)
        with c.cursor() as cur:
            cur.execute("SELECT (SELECT timeline_id FROM pg_control_checkpoint()) = "
                        "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int")
            ok = cur.fetchone()[0]
        c.close()
        return ok
    except Exception:
        return False


# ---------------------------------------------------------------- a trial

def trial(a, d, n, path, tno, tid):
    res = {"path": path, "trial": tno, "table_trial": tid}
    everyone = list(range(1, n + 1))
    master_ip = wait_for(lambda: healthy(d, n, everyone), a.timeout)
    if not master_ip:
        res["error"] = "cluster not healthy before the trial"
        return res
    victim = int(master_ip.rsplit(".", 1)[1])
    survivors = [k for k in everyone if k != victim]
    res["old_master"] = master_ip
    pid_agent = read_pid(f"{d}/peer{victim}/causeway.pid")
    data = f"{d}/peer{victim}/db/cluster"
    pid_pm = read_pid(f"{data}/postmaster.pid")
    if not pid_agent or f"peer{victim}/causeway.toml" not in cmdline(pid_agent):
        res["error"] = f"cannot identify the causeway process of peer{victim}"
        return res
    if not pid_pm or data not in cmdline(pid_pm):
        res["error"] = f"cannot identify the postmaster of peer{victim}"
        return res

    if path == "endpoint":
        # a surviving node's endpoint; 127.0.0.2, 127.0.0.3, ... before 127.0.0.1
        ep = sorted(survivors, key=lambda k: (k == 1, k))[0]
        the_dsn = dsn(d, [f"127.0.0.{ep}"], 9899, False)
        res["via"] = f"127.0.0.{ep}:9899"
    else:
        the_dsn = dsn(d, [f"127.0.0.{k}" for k in everyone], 5432, True)
        res["via"] = "multihost:5432 read-write"

    w = Writer(the_dsn, tid, a.interval, duration=a.timeout * 4)
    w.start()
    warm = a.warmup + random.uniform(0, a.jitter)
    res["warmup_s"] = round(warm, 3)
    time.sleep(warm)
    acks, _, _, _ = w.snapshot()
    if not acks:
        w.stop()
        w.join(10)
        res["error"] = "writer got no acknowledgement during warm-up: " + str(w.snapshot()[1][-1:])
        return res

    offsets = {k: log_size(d, k) for k in everyone}
    victims = [pid_agent, pid_pm] + children(pid_pm)
    t_kill_wall = time.time()
    t_kill = time.monotonic()
    for p in victims:  # node loss: agent, postmaster and its children in one burst
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    res["killed_pids"] = len(victims)
    deadline = t_kill + a.timeout

    first_write = primary_seen = None
    while time.monotonic() < deadline:
        acks, _, _, _ = w.snapshot()
        if first_write is None:
            for s, t, host, conn_t in acks:
                if conn_t > t_kill:
                    first_write = (t, host)
                    break
        if primary_seen is None:
            for k in survivors:
                if http_status(f"127.0.0.{k}", "/primary") == 200:
                    primary_seen = (time.monotonic(), k)
                    break
        if first_write and primary_seen:
            break
        time.sleep(0.02)
    acks, fails, _, _ = w.snapshot()
    pre = [t for s, t, h, c in acks if t <= t_kill]
    fails_after = [t for s, t, m in fails if t >= t_kill]
    res["first_fail_s"] = round(min(fails_after) - t_kill, 3) if fails_after else None
    if first_write is None:
        res["error"] = f"no acknowledged write on a new connection within {a.timeout:.0f} s of the kill"
    else:
        res["failover_s"] = round(first_write[0] - t_kill, 3)
        res["write_gap_s"] = round(first_write[0] - max(pre), 3) if pre else None
        res["first_write_host"] = first_write[1]
    if primary_seen:
        res["primary_http_s"] = round(primary_seen[0] - t_kill, 3)
        res["new_master"] = f"127.0.0.{primary_seen[1]}"
        pa = promoted_at(d, primary_seen[1], offsets[primary_seen[1]])
        res["promote_logged_s"] = round(pa - t_kill_wall, 3) if pa else None

    if a.wait_checkpoint and first_write:
        # work-around (see --wait-checkpoint): the new master's first checkpoint on its new
        # timeline, so that pg_rewind against it reads the right timeline from its pg_control
        t0 = time.monotonic()
        res["checkpoint_wait_s"] = round(time.monotonic() - t0, 3) if wait_for(lambda: new_tli_checkpointed(d, n), a.timeout, 0.2) else None

    # the killed peer back; the cluster healthy again (every node's view)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid_agent}"):
            break
        time.sleep(0.05)
    t_restart = time.monotonic()
    start_peer(d, victim)
    final = wait_for(lambda: healthy(d, n, everyone), a.timeout, 0.25)
    res["rejoin_s"] = round(time.monotonic() - t_restart, 3) if final else None
    res["master_after"] = final
    if not final:
        res["error"] = (res.get("error", "") + f" cluster not healthy {a.timeout:.0f} s after restarting peer{victim}").strip()
    time.sleep(1.0)
    w.stop()
    w.join(15)
    acks, fails, conns, amb = w.snapshot()
    res["acked"] = len(acks)
    res["attempts_failed"] = len(fails)
    res["connections"] = len(conns)
    res["last_fail_msgs"] = sorted({m.split(":", 1)[0] + ": " + m.split(":", 1)[1].strip()[:70]
                                    for s, t, m in fails})[:6]
    try:
        c = master_conn(d, n)
        with c.cursor() as cur:
            cur.execute("SELECT seq FROM bench WHERE trial = %s", (tid,))
            present = {r[0] for r in cur.fetchall()}
        c.close()
        acked = {s for s, _, _, _ in acks}
        lost = sorted(acked - present)
        res["lost"] = len(lost)
        res["lost_seqs"] = lost[:20]
        res["ambiguous"] = len(amb)
        res["ambiguous_present"] = sum(1 for s in amb if s in present)
        res["acked_seqs"] = sorted(acked)  # for the end-of-run check on every node
    except Exception as e:
        res["error"] = (res.get("error", "") + f" loss check failed: {e}").strip()
    if res.get("error") or res.get("lost"):
        res["log_lines"] = {f"peer{k}": dbcluster_log_lines(d, k, offsets[k], 40) for k in everyone}
        res["evidence"] = keep_evidence(d, f"{path}-trial{tno}", {k: v for k, v in res.items() if k != "acked_seqs"})
    return res


def fmt(r):
    keys = ["path", "trial", "old_master", "via", "new_master", "failover_s", "write_gap_s", "first_fail_s",
            "primary_http_s", "promote_logged_s", "checkpoint_wait_s", "rejoin_s", "acked", "lost", "ambiguous",
            "ambiguous_present", "error"]
    return "TRIAL " + " ".join(f"{k}={r[k]}" for k in keys if k in r)


def summarize(rows, paths):
    out = {}
    for p in paths:
        rs = [r for r in rows if r["path"] == p]
        s = {"trials": len(rs), "errors": sum(1 for r in rs if r.get("error")),
             "lost_total": sum(r.get("lost", 0) for r in rs),
             "acked_total": sum(r.get("acked", 0) for r in rs)}
        for k in ("failover_s", "write_gap_s", "primary_http_s", "promote_logged_s", "checkpoint_wait_s", "rejoin_s"):
            v = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
            if v:
                s[k] = {"median": round(statistics.median(v), 3), "min": min(v), "max": max(v), "n": len(v)}
        out[p] = s
    return out


def final_check_every_node(d, n, rows, timeout=20):
    """Every acknowledged row of the run on every node (standbys read on their own 5432)."""
    want = {(r["table_trial"], s) for r in rows for s in r.get("acked_seqs", [])}
    result = {}
    for k in range(1, n + 1):
        missing = None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                c = psycopg2.connect(dsn(d, [f"127.0.0.{k}"], 5432, False))
                with c.cursor() as cur:
                    cur.execute("SELECT trial, seq FROM bench")
                    have = set(cur.fetchall())
                c.close()
                missing = len(want - have)
                if missing == 0:
                    break
            except Exception as e:
                missing = f"error: {e}".strip()[:120]
            time.sleep(0.5)
        result[f"127.0.0.{k}"] = missing
    return result


# ---------------------------------------------------------------- the anchor

def anchor(a):
    venv = os.environ.get("VENV", "/tmp/patroni-venv")
    missing = []
    if not shutil.which("etcd"):
        missing.append("etcd (Debian etcd-server)")
    if not os.access(f"{venv}/bin/patroni", os.X_OK):
        missing.append(f"patroni in {venv} (pip install 'patroni[etcd3]' psycopg2-binary)")
    if not os.access(f"{ANCHOR_DIR}/run.sh", os.X_OK):
        missing.append(f"{ANCHOR_DIR}/run.sh")
    if missing:
        log("Patroni anchor not run: it needs " + ", ".join(missing) +
            " and this script installs nothing; comparing with its recorded figures")
        return {"ran": False, "missing": missing, "recorded": ANCHOR_RECORDED}
    out = {"ran": True, "recorded": ANCHOR_RECORDED, "runs": {}}
    for timing in ("default", "tuned"):
        rdir = tempfile.mkdtemp(prefix=f"patroni-{timing}-")
        env = dict(os.environ, RESULTS=f"{rdir}/results.jsonl")
        log(f"Patroni anchor: run.sh -n {a.trials} -t {timing} -k node -s on")
        r = subprocess.run([f"{ANCHOR_DIR}/run.sh", "-n", str(a.trials), "-t", timing, "-k", "node", "-s", "on"],
                           capture_output=True, text=True, env=env, timeout=2400)
        summary = [x for x in r.stdout.splitlines() if x.startswith("SUMMARY")]
        fo = []
        try:
            for line in open(f"{rdir}/results.jsonl"):
                j = json.loads(line)
                if isinstance(j.get("failover_s"), (int, float)):
                    fo.append(j["failover_s"])
        except OSError:
            pass
        out["runs"][timing] = {"rc": r.returncode, "summary": summary, "failover_s": fo,
                               "median_s": statistics.median(fo) if fo else None}
        print("\n".join(summary), flush=True)
    return out


# ---------------------------------------------------------------- main

def machine():
    def run(c):
        try:
            return subprocess.run(c, capture_output=True, text=True, shell=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"nproc": run("nproc"), "free_g": run("free -g"), "date": run("date -Is"), "uname": run("uname -r")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="trials per path (1..100)")
    ap.add_argument("--peers", type=int, default=3, help="lab peers (3..16)")
    ap.add_argument("--dir", default=None, help="lab directory (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="results JSON (default: DIR/db_failover.json)")
    ap.add_argument("--paths", default="endpoint,multihost")
    ap.add_argument("--interval", type=float, default=0.02, help="writer pause between INSERTs (the anchor's)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--jitter", type=float, default=1.0, help="random extra warm-up, uniform 0..J s (the lease is 1 s)")
    ap.add_argument("--timeout", type=float, default=60.0, help="cap of each wait in a trial, s")
    ap.add_argument("--wait-checkpoint", action="store_true",
                    help="before restarting the killed peer, wait until the new master has checkpointed on "
                         "its new timeline (a work-around: a pg_rewind against a master that has not yet "
                         "leaves a data directory that cannot start, see bench/RESULTS.md)")
    ap.add_argument("--with-anchor", action="store_true", help="also run the Patroni anchor if it is installed")
    a = ap.parse_args()
    if not 1 <= a.trials <= 100 or not 3 <= a.peers <= 16:
        sys.exit("--trials must be 1..100 and --peers 3..16")
    paths = [p for p in a.paths.split(",") if p]
    if not paths or any(p not in ("endpoint", "multihost") for p in paths):
        sys.exit("--paths: endpoint and/or multihost")
    if not os.access(BIN, os.X_OK):
        sys.exit(f"{BIN} missing: cargo build --release")

    lockf = open(LOCK, "w")
    try:
        fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"another lab benchmark holds {LOCK}")
    busy = ports_busy(a.peers)
    if busy:
        sys.exit(f"ports in use (a lab is running?): {' '.join(busy)}")

    n = a.peers
    d = os.path.abspath(a.dir) if a.dir else tempfile.mkdtemp(prefix="cw-bench-db-")
    out_path = a.out or os.path.join(d, "db_failover.json")
    started = False

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    rows = []
    report = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "machine": machine(),
              "params": vars(a), "dir": d}
    t_run = time.monotonic()
    try:
        log(f"lab up --peers {n} --dir {d}")
        started = True
        sh("lab", "up", "--peers", str(n), "--dir", d, timeout=600)
        everyone = list(range(1, n + 1))
        m = wait_for(lambda: healthy(d, n, everyone), 120)
        if not m:
            raise RuntimeError("the database cluster never became healthy after lab up: " +
                               json.dumps(db_status(d, 1)))
        log(f"healthy, master {m}")
        c = master_conn(d, n)
        with c.cursor() as cur:
            cur.execute(anchor_writer.DDL)
            cur.execute("SHOW synchronous_standby_names")
            report["synchronous_standby_names"] = cur.fetchone()[0]
            cur.execute("SHOW synchronous_commit")
            report["synchronous_commit"] = cur.fetchone()[0]
        c.close()
        log(f"synchronous_standby_names = {report['synchronous_standby_names']!r}, "
            f"synchronous_commit = {report['synchronous_commit']}")
        for t in range(1, a.trials + 1):
            for i, p in enumerate(paths):
                r = trial(a, d, n, p, t, (i + 1) * 1000 + t)
                rows.append(r)
                print(fmt(r), flush=True)
                if r.get("error") and r.get("master_after") is None and "before the trial" in r["error"]:
                    raise RuntimeError(f"trial {t} ({p}): {r['error']}")
        report["every_node_missing"] = final_check_every_node(d, n, rows)
        log(f"acknowledged rows missing per node at the end: {report['every_node_missing']}")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}): stopping the lab")
        report["interrupted"] = True
    except Exception as e:
        log(f"error: {e}")
        report["error"] = str(e)
        if started:
            report["evidence"] = keep_evidence(d, "run-error", {"error": str(e)})
    finally:
        if started:
            try:
                r = sh("lab", "down", "--dir", d, timeout=120, check=False)
                print(r.stdout.strip(), flush=True)
            except Exception as e:
                log(f"lab down failed: {e}")
            stray_postmasters(d, n)
    report["wall_s"] = round(time.monotonic() - t_run, 1)
    report["summary"] = summarize(rows, paths)
    if a.with_anchor and not report.get("interrupted"):
        report["anchor"] = anchor(a)
    else:
        report["anchor"] = {"ran": False, "recorded": ANCHOR_RECORDED}
    report["trials"] = [{k: v for k, v in r.items() if k != "acked_seqs"} for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)

    print()
    for p, s in report["summary"].items():
        fo = s.get("failover_s")
        line = f"SUMMARY path={p} trials={s['trials']} errors={s['errors']} acked={s['acked_total']} lost={s['lost_total']}"
        if fo:
            line += f" failover median={fo['median']:.3f}s max={fo['max']:.3f}s min={fo['min']:.3f}s"
            ratios = [f"{ANCHOR_RECORDED['default_median_s'] / fo['median']:.1f}x (Patroni default 22.2 s, recorded)",
                      f"{ANCHOR_RECORDED['tuned_median_s'][0] / fo['median']:.1f}x (tuned 18.8 s, recorded)"]
            for timing, run in (report["anchor"].get("runs") or {}).items():
                if run.get("median_s"):
                    ratios.append(f"{run['median_s'] / fo['median']:.1f}x (Patroni {timing} {run['median_s']:.1f} s, this run)")
            line += " | faster than " + ", ".join(ratios)
        for k in ("primary_http_s", "promote_logged_s", "checkpoint_wait_s", "rejoin_s"):
            if s.get(k):
                line += f" {k} median={s[k]['median']:.3f} max={s[k]['max']:.3f}"
        print(line)
    if report.get("every_node_missing") is not None:
        print(f"every acknowledged row on every node: missing {report['every_node_missing']}")
    print(f"results: {out_path}")
    if report.get("interrupted"):
        sys.exit(130)
    bad = report.get("error") or any(s["lost_total"] or s["errors"] for s in report["summary"].values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
