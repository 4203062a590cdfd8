#!/usr/bin/env python3
"""HA pairs: client-visible outage of the virtual IP when the active node fails, Causeway vs
keepalived, in one run (issue 14; docs/ha.md, "Benchmark").

Usage (root): bench/ha_failover.py [--trials 10] [--modes kill,linkdown,switchover]
                                   [--skip-keepalived] [--sip-interval-ms 5]

1. keepalived: the anchor (../shared/anchors/keepalived/run.sh) is run unchanged,
   `run.sh TRIALS 1,0.1 crash,linkdown --outdir DIR` (its extra-arguments slot only sets where
   it writes). Its per-trial JSON lines are captured. The anchor itself reports nothing about
   two holders, so this script watches its namespaces ka1/ka2 from outside (`ip -ts -n kaN
   monitor link address`, read-only, started once the anchor has made them) and attributes
   every interval with 198.18.0.10 on both nodes to the trial whose JSON line follows it.
   The anchor's `crash` (keepalived and the service killed together) is the comparison for
   Causeway's `kill`.
2. Causeway at its defaults: `causeway lab ha up --prefix cwhb --subnet 198.18.0` with a copy
   of target/release/causeway (/tmp/cw-bench-causeway, copied at start, so a rebuild during
   the run changes nothing). A UDP echo server bound to 198.18.0.10:7777 with IP_FREEBIND runs
   in cwhb-p and cwhb-s (it answers only where the VIP is, and from the VIP), probed by the
   anchor's own prober (`failover.py probe 198.18.0.10 7777 0.001 COUNT OUT` in cwhb-c) with
   the anchor's outage definition (copied below, `anchor_outage`). bench/ha_probe.py (SIP
   OPTIONS on 5060, every --sip-interval-ms) runs in parallel in the same trials, same
   definition. The fault comes ~1 s after probing starts plus a random 0-50 ms:
     kill       kill -9 of the primary's causeway (PID file) and of its echo server
     linkdown   ip -n cwhb-p link set eth0 down (up again after the trial)
     switchover causeway --node DIR/primary ha switchover --force (planned; the previous
                failback is inside the 300 s guard window, --force only skips that check)
   Restore between trials: restart the killed primary (its PID into DIR/primary/causeway.pid)
   and its echo, link up, wait for TERMINATED on the primary, `ha failback --force`, wait for
   PRIMARY_ACTIVE / SECONDARY_ACTIVE and the echo answered by the primary, then >= 2 s.
   Two holders: `ip -ts -n cwhb-p|cwhb-s monitor link address` run through the whole
   Causeway phase, seeded with `ip -n X -o addr show dev eth0`; any instant with the VIP on
   both nodes is counted, per trial, in the fault window and in the restore window.
3. Every loop is bounded in count and time; traffic stays inside the namespaces; all that is
   started here is stopped by PID; `lab ha down` and the anchor's cleanup run at the end, also
   on errors; the script refuses to start if namespaces cwhb-* or the anchor's exist.
4. A summary table is printed; everything per trial goes to /tmp/ha_failover_results.json.
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ANCHOR_DIR = "/work/shared/anchors/keepalived"
ANCHOR_RUN = os.path.join(ANCHOR_DIR, "run.sh")
ANCHOR_PY = os.path.join(ANCHOR_DIR, "failover.py")
ANCHOR_NS = ["kabr", "ka1", "ka2", "client"]
HERE = os.path.dirname(os.path.abspath(__file__))
HA_PROBE = os.path.join(HERE, "ha_probe.py")
CW_SRC = os.path.join(os.path.dirname(HERE), "target", "release", "causeway")
CW = "/tmp/cw-bench-causeway"
PREFIX = "cwhb"
LAB_NS = [f"{PREFIX}-{x}" for x in ("br", "p", "s", "w", "c", "p2")]
NS_P, NS_S, NS_C = f"{PREFIX}-p", f"{PREFIX}-s", f"{PREFIX}-c"
VIP, ECHO_PORT, SIP_PORT = "198.18.0.10", 7777, 5060
INTERVAL = 0.001  # the anchor's probe interval
OUT_JSON = "/tmp/ha_failover_results.json"
STARTED = []  # (name, Popen) of everything started here; stopped by PID at the end


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def sh(*cmd, check=True, timeout=30):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def namespaces():
    return [l.split()[0] for l in sh("ip", "netns", "list").splitlines() if l.strip()]


def start(name, cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    STARTED.append((name, p))
    return p


def stop(name, p, sig=signal.SIGTERM, group=False):
    """Stops one Popen we started, by its PID (or its own process group, pgid == pid)."""
    if p.poll() is not None:
        return
    try:
        (os.killpg if group else os.kill)(p.pid, sig)
        p.wait(timeout=5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            (os.killpg if group else os.kill)(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=5)


def pid_alive(pid):
    """True unless the process is gone or a zombie (PID 1 here may not reap at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- helpers run inside netns
def echo_server(tag, seconds):
    """UDP echo on VIP:7777 with IP_FREEBIND: receives only where the VIP is, replies from it.
    Reply = the probe's 8-byte sequence number + tag, as the anchor's echo does."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    s.bind((VIP, ECHO_PORT))
    s.settimeout(1.0)
    t = tag.encode()
    deadline = time.monotonic() + seconds  # bounded lifetime
    while time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(64)
        except socket.timeout:
            continue
        try:
            s.sendto(data[:8] + t, addr)
        except OSError:  # link down, VIP gone: keep serving
            pass


# ---------------------------------------------------------------- outage (the anchor's)
def anchor_outage(sent, good, t0, interval):
    """Copied from the anchor's failover.py trial(): the longest run of consecutive unanswered
    probes sent after t0 (from t0 - interval), from the first lost probe's send time to the
    send time of the next answered probe (or the end of probing + interval)."""
    outage, out_at, i, n = 0.0, None, 0, len(sent)
    while i < n:
        if not good[i] and sent[i] >= t0 - interval:
            j = i
            while j < n and not good[j]:
                j += 1
            end = sent[j] if j < n else sent[-1] + interval
            if end - sent[i] > outage:
                outage, out_at = end - sent[i], sent[i]
            i = j
        else:
            i += 1
    return outage, out_at


def echo_result(path, t0, interval):
    with open(path) as f:
        d = json.load(f)
    sent, recv, who = d["sent"], d["recv"], d["who"]
    n = len(sent)
    good = [recv[i] is not None and recv[i] - sent[i] < 0.1 for i in range(n)]  # the anchor's
    outage, out_at = anchor_outage(sent, good, t0, interval)
    tk = [sent[k] - t0 for k in range(n) if good[k] and who[k] == "secondary" and sent[k] >= t0]
    last_ok = [k for k in range(n) if good[k]]
    return {"outage_ms": round(1000 * outage, 1),
            "outage_start_ms": round(1000 * (out_at - t0), 1) if out_at is not None else None,
            "takeover_ms": round(1000 * tk[0], 1) if tk else None,
            "lost_probes": sum(1 for k in range(n) if sent[k] >= t0 and not good[k]),
            "recovered": bool(last_ok) and sent[last_ok[-1]] > t0 and good[-1],
            "first_probe_before_t0_ms": round(1000 * (t0 - sent[0]), 1),
            "prober_max_send_gap_ms": round(1000 * max(b - a for a, b in zip(sent, sent[1:])), 1),
            "answered_by_after_t0": sorted({who[k] for k in range(n) if good[k] and sent[k] >= t0})}


def sip_result(path, t0, interval):
    sent, good = [], []
    with open(path) as f:
        for line in f:
            p = line.split()
            sent.append(float(p[0]))
            good.append(p[1] == "1")  # ha_probe.py: a 200 within 100 ms
    n = len(sent)
    outage, out_at = anchor_outage(sent, good, t0, interval)
    return {"outage_ms": round(1000 * outage, 1),
            "outage_start_ms": round(1000 * (out_at - t0), 1) if out_at is not None else None,
            "lost_probes": sum(1 for k in range(n) if sent[k] >= t0 and not good[k]),
            "recovered": bool(good) and good[-1],
            "first_probe_before_t0_ms": round(1000 * (t0 - sent[0]), 1),
            "prober_max_send_gap_ms": round(1000 * max(b - a for a, b in zip(sent, sent[1:])), 1)}


# ---------------------------------------------------------------- address monitors
TS_RE = re.compile(r"^\[(\d{4}-\d\d-\d\dT[\d:.]+)\]\s*(.*)$")
ADDR_RE = re.compile(r"^(Deleted\s+)?\d+:\s+(\S+)\s+inet\s+(\d+\.\d+\.\d+\.\d+)/\d+")
LINK_RE = re.compile(r"^(Deleted\s+)?\d+:\s+([^:@\s]+)(@\S+)?:\s+<([^>]*)>")


def parse_ts(s):
    return datetime.datetime.fromisoformat(s).timestamp()  # ip -ts prints local time


class Monitor:
    """`ip -ts -n NS monitor link address`: events (wall time, 'vip', present) for the VIP on
    any interface and (wall time, 'link', admin-up) for eth0, seeded with `ip addr show`."""

    def __init__(self, ns, seconds):
        self.ns, self.events, self.raw = ns, [], []
        # `timeout` bounds its lifetime even if we were killed; it is stopped by PID anyway.
        self.p = start(f"monitor-{ns}", ["timeout", str(int(seconds)), "ip", "-ts", "-n", ns, "monitor", "link",
                                         "address"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.th = threading.Thread(target=self._read, daemon=True)
        self.th.start()
        time.sleep(0.05)
        self.seed()

    def seed(self):
        t = time.time()
        a = sh("ip", "-n", self.ns, "-o", "-4", "addr", "show", check=False)
        l = sh("ip", "-n", self.ns, "-o", "link", "show", "dev", "eth0", check=False)
        m = re.search(r"<([^>]*)>", l)
        self.events.append((t, "vip", f" inet {VIP}/" in a, "seed"))
        self.events.append((t, "link", bool(m) and "UP" in m.group(1).split(","), "seed"))

    def _read(self):
        for line in self.p.stdout:
            line = line.rstrip("\n")
            m = TS_RE.match(line)
            if not m:
                continue  # continuation lines (valid_lft, link/ether)
            t, body = parse_ts(m.group(1)), m.group(2)
            a = ADDR_RE.match(body)
            if a:
                if a.group(3) == VIP:
                    self.events.append((t, "vip", not a.group(1), body[:120]))
                    self.raw.append(line[:160])
                continue
            k = LINK_RE.match(body)
            if k and k.group(2) == "eth0":
                self.events.append((t, "link", not k.group(1) and "UP" in k.group(4).split(","), body[:120]))
                self.raw.append(line[:160])

    def close(self):
        stop(f"monitor-{self.ns}", self.p)
        self.th.join(2)


def holders_timeline(mons):
    """Merged timeline of both monitors -> intervals where both hold the VIP. Each interval:
    start, end (wall time), and whether a holder's eth0 was admin-down (isolated)."""
    ev = sorted((e[0], i, e[1], e[2]) for i, m in enumerate(mons) for e in m.events)
    held, up = [False] * len(mons), [True] * len(mons)
    overlaps, cur = [], None
    for t, i, kind, val in ev:
        if kind == "vip":
            held[i] = val
        else:
            up[i] = val
        both = all(held)
        if both and cur is None:
            cur = {"start": t, "isolated": not all(up)}
        elif both and cur is not None and not all(up):
            cur["isolated"] = True
        elif not both and cur is not None:
            cur["end"] = t
            overlaps.append(cur)
            cur = None
    if cur is not None:
        cur["end"] = None
        overlaps.append(cur)
    return overlaps


def vip_moves(mons, t_from, t_to):
    """Holder changes inside [t_from, t_to]: (wall time, node index, present)."""
    return sorted((e[0], i, e[2]) for i, m in enumerate(mons) for e in m.events
                  if e[1] == "vip" and e[3] != "seed" and t_from <= e[0] <= t_to)


def handover_gap_ms(mons, t_from, t_to):
    """Smallest time between one node's delete of the VIP and the other's add, in the window
    (negative = overlap). Repeated adds (the 500 ms lifetime refresh) are skipped."""
    mv = vip_moves(mons, t_from, t_to)
    held, gaps, last_del = [None, None], [], [None, None]
    for t, i, present in mv:
        if present and held[i] is not True:
            o = 1 - i
            if held[o] is True:
                gaps.append(-0.0)  # other still holds: overlap, counted elsewhere
            elif last_del[o] is not None:
                gaps.append(1000 * (t - last_del[o]))
        if not present and held[i] is not False:
            last_del[i] = t
        held[i] = present
    return round(min(gaps), 1) if gaps else None


def overlaps_in(overlaps, t_from, t_to):
    out = []
    for o in overlaps:
        if t_from <= o["start"] < t_to:
            end = o["end"]
            out.append({"start_wall": round(o["start"], 6),
                        "ms": round(1000 * (end - o["start"]), 2) if end else None,
                        "isolated_holder": o["isolated"]})
    return out


# ---------------------------------------------------------------- keepalived (the anchor)
def run_keepalived(trials, workdir, res):
    outdir = os.path.join(workdir, "keepalived")
    os.makedirs(outdir, exist_ok=True)
    cmd = ["bash", ANCHOR_RUN, str(trials), "1,0.1", "crash,linkdown", "--outdir", outdir]
    res["command"] = " ".join(cmd)
    limit = 300 + trials * 2 * 2 * 60  # 2 adverts x 2 modes, <= 60 s per trial
    log("keepalived anchor:", res["command"], f"(time limit {limit} s)")
    mons, stop_watch = {}, threading.Event()

    def watch():  # attach read-only address monitors once the anchor has made ka1/ka2
        t_end = time.monotonic() + limit
        while not stop_watch.is_set() and time.monotonic() < t_end and len(mons) < 2:
            for ns in ("ka1", "ka2"):
                if ns not in mons and os.path.exists(f"/run/netns/{ns}"):
                    try:
                        mons[ns] = Monitor(ns, limit + 60)
                    except Exception as e:
                        log(f"monitor {ns}: {e}")
            time.sleep(0.01)

    wt = threading.Thread(target=watch, daemon=True)
    wt.start()
    errf = open(os.path.join(outdir, "anchor.stderr"), "w")
    t_start = time.time()
    p = start("anchor", cmd, stdout=subprocess.PIPE, stderr=errf, text=True, start_new_session=True,
              env=dict(os.environ, KEEP_PROBES="1"))
    lines, trial_lines = [], []
    killer = threading.Timer(limit, lambda: p.poll() is None and os.killpg(p.pid, signal.SIGINT))
    killer.start()
    try:
        for line in p.stdout:
            t = time.time()
            line = line.rstrip("\n")
            lines.append(line)
            print("  [keepalived] " + line, file=sys.stderr, flush=True)
            if line.startswith("{"):
                try:
                    r = json.loads(line)
                    r["line_wall"] = t
                    trial_lines.append(r)
                except ValueError:
                    continue
                # The probe file (kept with KEEP_PROBES) dates the trial's probing window.
                pf = os.path.join(outdir, f"probe_{r['mode']}_{r['advert']}_{r['trial']}.json")
                try:
                    with open(pf) as f:
                        sent = json.load(f)["sent"]
                    off = time.time() - time.monotonic()
                    r["probe_wall"] = [round(sent[0] + off, 3), round(sent[-1] + off, 3)]
                    os.remove(pf)
                except (OSError, ValueError, KeyError, IndexError) as e:
                    log(f"probe file {pf}: {e!r}")
        rc = p.wait(timeout=60)
    finally:
        killer.cancel()
        if p.poll() is None:  # timed out or we are being stopped: let its cleanup run
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                stop("anchor", p, signal.SIGKILL, group=True)
        stop_watch.set()
        wt.join(5)
        for m in mons.values():
            m.close()
        errf.close()
    res["rc"] = p.returncode
    res["stdout"] = lines
    ml = [mons[n] for n in ("ka1", "ka2") if n in mons]
    overlaps = holders_timeline(ml) if len(ml) == 2 else []
    res["monitors"] = {n: m.raw for n, m in mons.items()}
    prev = t_start
    for r in trial_lines:
        # fault window: up to the end of the trial's probing (+0.3 s); restore: the rest
        mid = r["probe_wall"][1] + 0.3 if r.get("probe_wall") else r["line_wall"]
        r["two_holders_fault"] = overlaps_in(overlaps, prev, mid)
        r["two_holders_restore"] = overlaps_in(overlaps, mid, r["line_wall"])
        r["window_wall"] = [round(prev, 3), round(mid, 3), round(r["line_wall"], 3)]
        prev = r["line_wall"]
    res["overlaps_outside_trials"] = overlaps_in(overlaps, prev, float("inf"))
    res["trials"] = trial_lines
    res["monitored"] = len(ml) == 2
    if rc != 0:
        log(f"keepalived anchor exited with {rc}")


# ---------------------------------------------------------------- Causeway
class Lab:
    def __init__(self, workdir, sip_interval):
        self.dir = os.path.join(workdir, "cw-lab")
        self.p_dir = os.path.join(self.dir, "primary")
        self.s_dir = os.path.join(self.dir, "secondary")
        self.sip_interval = sip_interval
        self.echo = {}
        self.primary_proc = None  # our Popen once we restarted the primary
        self.mons = []
        self.up_done = False

    def cw(self, node_dir, *words, timeout=15, check=False):
        r = subprocess.run([CW, "--node", node_dir, *words], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"causeway {' '.join(words)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def state(self, node_dir):
        try:
            r = self.cw(node_dir, "ha", "status", "--json", timeout=10)
            v = json.loads(r.stdout)
            v = v.get("status", v)
            return v["pairs"][0]["state"]
        except Exception:
            return "unknown"

    def wait_state(self, want, timeout_s):
        t_end = time.monotonic() + timeout_s
        got = {}
        while time.monotonic() < t_end:
            got = {d: self.state(d) for d in want}
            if all(got[d] == s for d, s in want.items()):
                return True, got
            time.sleep(0.2)
        return False, got

    def up(self):
        for attempt in range(1, 4):
            r = subprocess.run([CW, "lab", "ha", "up", "--dir", self.dir, "--prefix", PREFIX, "--subnet", "198.18.0"],
                               capture_output=True, text=True, timeout=150)
            if r.returncode == 0:
                self.up_done = True
                log("lab ha up:", r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
                return attempt
            log(f"lab ha up attempt {attempt} failed: {(r.stderr.strip() or r.stdout.strip())[-400:]}")
            if os.path.exists(os.path.join(self.dir, "lab-ha.json")):
                self.down()
            # `up` removes what it made when it fails; make sure before trying again
            left = [n for n in LAB_NS if n in namespaces()]
            if left:
                raise RuntimeError(f"lab ha up failed and left namespaces {left}")
            os.rename(self.dir, f"{self.dir}.failed{attempt}")
            time.sleep(2)
        raise RuntimeError("lab ha up failed 3 times")

    def down(self):
        r = subprocess.run([CW, "lab", "ha", "down", "--dir", self.dir], capture_output=True, text=True, timeout=90)
        log("lab ha down:", (r.stdout.strip() + " " + r.stderr.strip()).strip().replace("\n", "; "))
        if self.primary_proc is not None:
            try:
                self.primary_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop("primary", self.primary_proc, group=True)

    def start_echo(self, role):
        ns = NS_P if role == "primary" else NS_S
        p = start(f"echo-{role}", ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "echo", role,
                                   "7200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.echo[role] = p
        return p

    def primary_pid(self):
        with open(os.path.join(self.p_dir, "causeway.pid")) as f:
            return int(f.read().strip())

    def restart_primary(self):
        cfg = os.path.join(self.p_dir, "causeway.toml")
        logf = open(os.path.join(self.p_dir, "causeway.log"), "a")
        p = start("primary", ["ip", "netns", "exec", NS_P, CW, "run", "--config", cfg], stdin=subprocess.DEVNULL,
                  stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        # `ip netns exec` execs: the PID is the node's.
        with open(os.path.join(self.p_dir, "causeway.pid"), "w") as f:
            f.write(f"{p.pid}\n")
        self.primary_proc = p

    def quick_probe_who(self, count=50, interval=0.01):
        out = f"/tmp/.hbprobe_{os.getpid()}.json"
        subprocess.run(["ip", "netns", "exec", NS_C, sys.executable, ANCHOR_PY, "probe", VIP, str(ECHO_PORT),
                        str(interval), str(count), out], timeout=30)
        with open(out) as f:
            d = json.load(f)
        os.remove(out)
        return [w for w in d["who"] if w][-20:]

    def healthy(self, timeout_s=60):
        """PRIMARY_ACTIVE / SECONDARY_ACTIVE and the last 20 echo answers from the primary."""
        t_end = time.monotonic() + timeout_s
        ok, got = self.wait_state({self.p_dir: "PRIMARY_ACTIVE", self.s_dir: "SECONDARY_ACTIVE"}, timeout_s)
        while ok and time.monotonic() < t_end:
            w = self.quick_probe_who()
            if w and all(x == "primary" for x in w):
                return True, got
            time.sleep(0.5)
        return False, got

    def restore(self, mode, res):
        t_r = time.monotonic()
        if mode == "linkdown":
            sh("ip", "-n", NS_P, "link", "set", "eth0", "up")
        if mode == "kill":
            if self.primary_proc is not None:
                self.primary_proc.wait(timeout=10)
            t_end = time.monotonic() + 10
            while pid_alive(res["_killed_pid"]) and time.monotonic() < t_end:
                time.sleep(0.05)
            self.echo["primary"].wait(timeout=10)
            self.restart_primary()
            self.start_echo("primary")
        ok, got = self.wait_state({self.p_dir: "TERMINATED"}, 60)
        res["restore_terminated_s"] = round(time.monotonic() - t_r, 2)
        if not ok:
            res["restore"] = f"FAILED: primary not TERMINATED within 60 s ({got})"
            return False
        fb = None
        for _ in range(30):  # bounded: 30 attempts, 1 s apart
            fb = self.cw(self.p_dir, "ha", "failback", "--force")
            if fb.returncode == 0:
                break
            time.sleep(1)
        res["failback"] = (fb.stdout.strip() or fb.stderr.strip())[:200]
        ok, got = self.healthy(60)
        res["restore_s"] = round(time.monotonic() - t_r, 2)
        if not ok:
            res["restore"] = f"FAILED: not healthy within 60 s after failback ({got})"
            return False
        return True

    def trial(self, mode, idx):
        pre = 1.0 + random.uniform(0.0, 0.05)  # ~1 s of probing, then a random phase
        post = 5.0
        count = int((pre + post) / INTERVAL)
        sip_count = int((pre + post) / self.sip_interval)
        tag = f"{mode}_{idx}"
        eout = os.path.join(self.dir, f"probe_echo_{tag}.json")
        sout = os.path.join(self.dir, f"probe_sip_{tag}.txt")
        w0 = time.time()
        pe = start("probe-echo", ["ip", "netns", "exec", NS_C, sys.executable, ANCHOR_PY, "probe", VIP,
                                  str(ECHO_PORT), str(INTERVAL), str(count), eout])
        ps = start("probe-sip", ["ip", "netns", "exec", NS_C, sys.executable, HA_PROBE, VIP, str(SIP_PORT),
                                 str(self.sip_interval), str(sip_count), sout])
        time.sleep(pre)
        res = {"mode": mode, "trial": idx}
        t0, t0_wall = time.monotonic(), time.time()
        if mode == "kill":
            pid = self.primary_pid()
            if "causeway" not in cmdline(pid) or not pid_alive(pid):
                raise RuntimeError(f"primary PID {pid} is not a running causeway: {cmdline(pid)!r}")
            os.kill(pid, signal.SIGKILL)
            os.kill(self.echo["primary"].pid, signal.SIGKILL)  # ip netns exec execs: the echo's PID
            res["_killed_pid"] = pid
        elif mode == "linkdown":
            sh("ip", "-n", NS_P, "link", "set", "eth0", "down")
        elif mode == "switchover":
            so = self.cw(self.p_dir, "ha", "switchover", "--force")
            res["switchover"] = (so.stdout.strip() or so.stderr.strip())[:200]
            res["switchover_rc"] = so.returncode
        t0b = time.monotonic()
        pe.wait(timeout=pre + post + 60)
        ps.wait(timeout=pre + post + 60)
        w1 = time.time()
        res["inject_us"] = round(1e6 * (t0b - t0))
        res["fault_wall"] = round(t0_wall, 6)
        res["echo"] = echo_result(eout, t0, INTERVAL)
        res["sip"] = sip_result(sout, t0, self.sip_interval)
        if not os.environ.get("KEEP_PROBES"):
            os.remove(eout)
            os.remove(sout)
        res["states_after"] = {"primary": self.state(self.p_dir), "secondary": self.state(self.s_dir)}
        ok = self.restore(mode, res)
        w2 = time.time()
        time.sleep(0.3)  # let the monitors' last lines arrive
        overlaps = holders_timeline(self.mons)
        res["two_holders_fault"] = overlaps_in(overlaps, w0, w1)
        res["two_holders_restore"] = overlaps_in(overlaps, w1, w2)
        res["handover_gap_ms"] = handover_gap_ms(self.mons, t0_wall - 0.01, w1)
        res["failback_gap_ms"] = handover_gap_ms(self.mons, w1, w2)
        res["vip_moves"] = [(round(t - t0_wall, 4), ["p", "s"][i], "add" if pr else "del")
                            for t, i, pr in vip_moves(self.mons, w0, w2)][:40]
        res.pop("_killed_pid", None)
        return res, ok


def run_causeway(trials, modes, workdir, sip_interval, res):
    lab = Lab(workdir, sip_interval)
    res["lab_dir"] = lab.dir
    res["trials"] = []
    try:
        res["lab_up_attempts"] = lab.up()
        n_trials = trials * len(modes)
        mon_s = 600 + n_trials * 150
        lab.mons = [Monitor(NS_P, mon_s), Monitor(NS_S, mon_s)]
        lab.start_echo("primary")
        lab.start_echo("secondary")
        ok, got = lab.healthy(60)
        if not ok:
            raise RuntimeError(f"lab not healthy before the first trial: {got}")
        time.sleep(2)
        t_limit = time.monotonic() + n_trials * 150 + 120  # whole Causeway phase
        for mode in modes:
            for i in range(1, trials + 1):
                if time.monotonic() > t_limit:
                    raise RuntimeError("Causeway phase over its time limit")
                r, ok = lab.trial(mode, i)
                res["trials"].append(r)
                e, s = r["echo"], r["sip"]
                log(f"causeway {mode} {i}: echo {e['outage_ms']} ms (takeover {e['takeover_ms']}), sip "
                    f"{s['outage_ms']} ms, two holders {len(r['two_holders_fault'])}/{len(r['two_holders_restore'])}, "
                    f"gap {r['handover_gap_ms']} ms, restore {r.get('restore_s')} s {r.get('restore', '')}")
                print(json.dumps({"system": "causeway", **r}), flush=True)
                if not ok:
                    raise RuntimeError(f"{mode} trial {i} did not recover: {r.get('restore')}")
                time.sleep(2)  # >= 2 s between trials
    finally:
        if len(lab.mons) == 2:  # every two-holder interval of the phase, in a trial or not
            time.sleep(0.3)
            res["two_holders_all"] = overlaps_in(holders_timeline(lab.mons), 0, float("inf"))
        for m in lab.mons:
            m.close()
        for role, p in lab.echo.items():
            stop(f"echo-{role}", p)
        res["node_logs"] = scan_logs(lab.dir)
        if lab.up_done or os.path.exists(os.path.join(lab.dir, "lab-ha.json")):
            lab.down()
        res["keepers_left"] = stop_keepers(lab.dir)


def scan_logs(d):
    """WARN/ERROR lines of the nodes' logs, counted by Detail."""
    out = {}
    for role in ("primary", "secondary", "witness"):
        path = os.path.join(d, role, "causeway.log")
        counts = {}
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    m = re.search(r'Level="(WARN|ERROR)"', line)
                    if not m and "panic" not in line.lower():
                        continue
                    det = re.search(r'Detail="([^"]*)"', line)
                    key = f"{m.group(1) if m else 'PANIC'}: {det.group(1) if det else line.strip()[:120]}"
                    counts[key] = counts.get(key, 0) + 1
        except OSError:
            continue
        out[role] = counts
    return out


def stop_keepers(d):
    """Keepers are spawned by the nodes and exit on their agent's EOF; any still alive after
    `lab ha down` is stopped by the PID in its file."""
    left = []
    for role in ("primary", "secondary", "witness"):
        path = os.path.join(d, role, "ha", "keeper.pid")
        try:
            pid = int(open(path).read().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid) and "keeper" in cmdline(pid):
            left.append((role, pid))
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return left


# ---------------------------------------------------------------- summary
def stats(v):
    v = [x for x in v if x is not None]
    return (statistics.median(v), max(v), len(v)) if v else (None, None, 0)


def fmt(x):
    return "n/a" if x is None else f"{x:.0f}"


def two_holder_counts(rs):
    def n(keys, links_up=False):
        return sum(1 for r in rs if any(not (links_up and o["isolated_holder"])
                                        for k in keys for o in r.get(k, [])))
    both = ("two_holders_fault", "two_holders_restore")
    return {"two_holder_trials": n(both), "two_holder_trials_fault": n(both[:1]),
            "two_holder_trials_restore": n(both[1:]), "two_holder_trials_links_up": n(both, True),
            "two_holder_max_ms": max((o["ms"] or float("inf") for r in rs for k in both for o in r.get(k, [])),
                                     default=None)}


def summarize(results, modes):
    rows = []
    ka = results.get("keepalived", {}).get("trials", [])
    cw = results.get("causeway", {}).get("trials", [])
    for mode in modes:
        kmode = {"kill": "crash", "linkdown": "linkdown"}.get(mode)
        for adv, label in (("1", "keepalived advert 1 s (default)"), ("0.1", "keepalived advert 0.1 s")):
            rs = [r for r in ka if kmode and r["mode"] == kmode and str(r["advert"]) == adv]
            if rs:
                med, mx, n = stats([r["outage_ms"] for r in rs])
                rows.append({"mode": mode, "system": label + f" [{kmode}]", "n": n, "median_ms": med, "max_ms": mx,
                             **two_holder_counts(rs),
                             "restore_failures": sum(1 for r in rs if r.get("restore"))})
        rs = [r for r in cw if r["mode"] == mode]
        if rs:
            for probe, label in (("echo", "Causeway defaults, echo probe"), ("sip", "Causeway defaults, SIP OPTIONS")):
                med, mx, n = stats([r[probe]["outage_ms"] for r in rs])
                rows.append({"mode": mode, "system": label, "n": n, "median_ms": med, "max_ms": mx,
                             **two_holder_counts(rs),
                             "restore_failures": sum(1 for r in rs if r.get("restore"))})
    for row in rows:  # ratios of the Causeway echo median to keepalived's, same mode
        if row["system"] == "Causeway defaults, echo probe" and row["median_ms"]:
            for r2 in rows:
                if r2["mode"] == row["mode"] and r2["system"].startswith("keepalived") and r2["median_ms"]:
                    key = "ratio_vs_ka_default" if "advert 1 s" in r2["system"] else "ratio_vs_ka_0.1"
                    row[key] = round(row["median_ms"] / r2["median_ms"], 3)
    return rows


def print_table(rows):
    print()
    print(f"{'mode':<11} {'system':<46} {'n':>3} {'median ms':>10} {'max ms':>8}  two-holder trials: all "
          f"(fault/restore, links up) longest  ratios")
    for r in rows:
        rat = " ".join(f"{k[9:]}={r[k]}" for k in ("ratio_vs_ka_default", "ratio_vs_ka_0.1") if k in r)
        th = (f"{r['two_holder_trials']:>3} ({r['two_holder_trials_fault']}/{r['two_holder_trials_restore']}, "
              f"{r['two_holder_trials_links_up']}) {fmt(r['two_holder_max_ms'])} ms")
        print(f"{r['mode']:<11} {r['system']:<46} {r['n']:>3} {fmt(r['median_ms']):>10} {fmt(r['max_ms']):>8}  "
              f"{th:<28} {rat}"
              + (f"  restore_failures={r['restore_failures']}" if r["restore_failures"] else ""))


# ---------------------------------------------------------------- main
def ka_version():
    if not shutil.which("keepalived"):
        return None
    r = subprocess.run(["keepalived", "--version"], capture_output=True, text=True)
    return ((r.stdout + r.stderr).strip().splitlines() or [""])[0]


def main():
    ap = argparse.ArgumentParser(description="HA VIP failover: Causeway vs keepalived")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--modes", default="kill,linkdown,switchover")
    ap.add_argument("--skip-keepalived", action="store_true")
    ap.add_argument("--sip-interval-ms", type=float, default=5.0)
    ap.add_argument("--no-copy", action="store_true", help=f"use {CW} as it is")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if not (1 <= a.trials <= 50) or any(m not in ("kill", "linkdown", "switchover") for m in modes):
        sys.exit("--trials 1..50; --modes from kill,linkdown,switchover")
    if not (1 <= a.sip_interval_ms <= 100):
        sys.exit("--sip-interval-ms 1..100")
    if os.geteuid() != 0:
        sys.exit("run as root (namespaces, virtual IP)")
    clash = [n for n in LAB_NS + ANCHOR_NS if n in namespaces()]
    if clash:
        sys.exit(f"netns {clash} exist already; refusing to start (not ours to touch)")
    if not a.skip_keepalived and not shutil.which("keepalived"):
        sys.exit("keepalived is not installed: apt-get install -y keepalived")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM"))  # run the finally blocks
    if not a.no_copy:
        shutil.copy2(CW_SRC, CW)
    with open(CW, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    workdir = f"/tmp/ha_failover_run/{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(workdir)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    results = {"meta": {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "argv": sys.argv, "nproc": os.cpu_count(), "uname_r": os.uname().release, "cpu": cpu,
                        "causeway_binary": CW, "causeway_sha256": digest,
                        "causeway_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(CW))),
                        "keepalived": ka_version(),
                        "probe_interval_ms": 1000 * INTERVAL, "sip_interval_ms": a.sip_interval_ms,
                        "workdir": workdir, "trials": a.trials, "modes": modes}}
    errors = []
    load, stop_load = [], threading.Event()

    def sample_load():  # evidence of other work on the machine (e.g. a compile): every 10 s
        for _ in range(100000):
            comms = []
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        comms.append(open(f"/proc/{d}/comm").read().strip())
                    except OSError:
                        pass
            load.append((round(time.time()), open("/proc/loadavg").read().split()[0],
                         sum(1 for c in comms if c in ("rustc", "cargo", "cc", "ld", "cargo-nextest"))))
            if stop_load.wait(10):
                return

    threading.Thread(target=sample_load, daemon=True).start()
    try:
        if not a.skip_keepalived:
            results["keepalived"] = {}
            try:
                run_keepalived(a.trials, workdir, results["keepalived"])
            except Exception as e:
                errors.append(f"keepalived: {e!r}")
                log(f"keepalived phase failed: {e!r}")
            finally:
                if any(n in namespaces() for n in ANCHOR_NS):  # ours: checked absent at start
                    sh(sys.executable, ANCHOR_PY, "down", check=False)
            time.sleep(2)
        results["causeway"] = {}
        try:
            run_causeway(a.trials, modes, workdir, a.sip_interval_ms / 1000.0, results["causeway"])
        except Exception as e:
            errors.append(f"causeway: {e!r}")
            log(f"causeway phase failed: {e!r}")
    finally:
        for name, p in reversed(STARTED):
            try:
                stop(name, p, group=name in ("anchor", "primary"))
            except Exception as e:
                log(f"stop {name} pid {p.pid}: {e}")
        if any(n in namespaces() for n in ANCHOR_NS) and "keepalived" in results:
            sh(sys.executable, ANCHOR_PY, "down", check=False)
        left = [n for n in LAB_NS + ANCHOR_NS if n in namespaces()]
        alive = [(n, p.pid) for n, p in STARTED if p.poll() is None]
        stop_load.set()
        results["meta"]["load_samples"] = load  # (wall time, 1-min load average, rustc/cargo/ld processes)
        results["meta"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results["meta"]["left_namespaces"] = left
        results["meta"]["left_processes"] = alive
        results["errors"] = errors
        results["summary"] = summarize(results, modes)
        with open(OUT_JSON, "w") as f:
            json.dump(results, f, indent=1)
        print_table(results["summary"])
        print(f"\nper-trial results: {OUT_JSON}; work directory {workdir}")
        if left or alive:
            log(f"WARNING left behind: namespaces {left}, processes {alive}")
        if errors:
            log("errors:", errors)
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        echo_server(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(main())
