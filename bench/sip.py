#!/usr/bin/env python3
"""SIP benchmark: Causeway's clustered registrar/proxy against Kamailio, in one run.

usage: bench/sip.py [--rates 5000,8000,...] [--call-rates 1000,1500,...] [--duration S]
                    [--bindings N] [--probes N] [--skip-anchor]

For each rate, the Kamailio anchor (../shared/anchors/kamailio/run.sh, a plain in-memory
registrar on 127.0.0.1:5070) runs first, then the same SIPp scenario runs against peer 1
of a 3-peer Causeway cluster (127.0.50.1-3, TLS Enforce, replication to both other peers
on). The highest rate each passes (< 0.1 % failed, >= 97 % of the target achieved) gives
the ratio. Then, on Causeway only:
  - visibility: REGISTER on peer 1, then INVITE for that AOR through peer 3 until it
    arrives at the contact (registration -> callable from another peer), --probes times;
  - resync: --bindings unique AORs registered, peer 3 killed -9 and restarted, time until
    it holds them all again;
  - memory: peer 1's RSS before and after those bindings.
Traffic goes only to 127.0.0.0/8; every process started is stopped by PID at the end.
Environment: SIPP_BUFF=N sets SIPp's socket buffers for the Causeway runs (default 65535,
SIPp's own; the anchor always uses SIPp's default), SIPP_RTT=1 keeps per-call RTT files
(with --keep).
Needs: apt-get install -y kamailio sip-tester; cargo build --release.
"""
import argparse, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "causeway")
ANCHOR = os.path.join(ROOT, "..", "shared", "anchors", "kamailio")
NET = "127.0.50"
STARTED = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def start(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    STARTED.append(p)
    return p


def stop_all():
    for p in reversed(STARTED):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cli(node_dir, *args):
    return subprocess.run([BIN, "--node", node_dir, *args], capture_output=True, text=True, timeout=60)


def metric(node_dir, name):
    out = subprocess.run(["curl", "-s", "--unix-socket", os.path.join(node_dir, "admin.sock"),
                          "http://peer/metrics"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(rf"^{name} ([0-9.e+]+)$", out, re.M)
    return float(m.group(1)) if m else None


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Cluster:
    def __init__(self, tmp, n=3):
        self.tmp, self.n, self.procs = tmp, n, {}
        ca = os.path.join(tmp, "ca")
        subprocess.run([BIN, "pki", "ca", "init", "--dir", ca], check=True, capture_output=True)
        peers = ", ".join(f'"{NET}.{k}"' for k in range(1, n + 1))
        for k in range(1, n + 1):
            d = self.dir(k)
            os.makedirs(d)
            subprocess.run([BIN, "pki", "csr", "node", f"CN:{NET}.{k}"], cwd=d, check=True, capture_output=True)
            subprocess.run([BIN, "pki", "sign", "node.csr", "--ca-dir", ca], cwd=d, check=True, capture_output=True)
            shutil.copy(os.path.join(ca, "ca.crt"), d)
            with open(os.path.join(d, "causeway.toml"), "w") as f:
                f.write(f'[node]\nsystem_name = "peer{k}"\naddress = "{NET}.{k}"\ndata_dir = "{d}"\n\n'
                        f'[cluster]\nname = "bench.example"\ntls_verification = "Enforce"\npeers = [{peers}]\n\n'
                        f'[sip]\nrate_per_source = 100000\n')
        for k in range(1, n + 1):
            self.launch(k)
        self.wait_formed()
        r = cli(self.dir(1), "xconfiguration", "set", "sip.domains", "bench.example")
        assert r.returncode == 0, r.stderr

    def dir(self, k):
        return os.path.join(self.tmp, f"peer{k}")

    def launch(self, k):
        log_f = open(os.path.join(self.dir(k), "causeway.log"), "a")
        self.procs[k] = start([BIN, "run", "--config", os.path.join(self.dir(k), "causeway.toml")],
                              stdout=log_f, stderr=subprocess.STDOUT)

    def kill9(self, k):
        p = self.procs.pop(k)
        p.kill()
        p.wait()

    def wait_formed(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ok = True
            for k in self.procs:
                r = cli(self.dir(k), "xstatus", "cluster", "--json")
                if r.returncode != 0:
                    ok = False
                    break
                s = json.loads(r.stdout)
                if not all(p["clustering"]["state"] in ("Active", "This system") for p in s["peers"]):
                    ok = False
                    break
            if ok:
                return
            time.sleep(0.2)
        raise SystemExit("cluster did not form")


def sipp_run(target, scenario, rate, calls, outdir, port, extra=()):
    """One bounded SIPp load; (ok, failed, achieved/s)."""
    os.makedirs(outdir, exist_ok=True)
    p = start(["timeout", str(calls // max(rate, 1) + 60), "sipp", target, "-sf", scenario,
               "-i", "127.0.0.1", "-p", str(port), "-r", str(rate), "-m", str(calls),
               "-l", str(max(1000, rate * 6)), "-timeout", f"{calls // max(rate, 1) + 30}s",
               "-nostdin", *(("-trace_rtt", "-rtt_freq", "1000") if os.environ.get("SIPP_RTT") else ()), "-buff_size", os.environ.get("SIPP_BUFF", "65535"), "-trace_err", "-trace_stat", "-stf", "stat.csv", "-fd", "1", *extra],
              cwd=outdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.wait()
    with open(os.path.join(outdir, "stat.csv")) as f:
        rows = [r.split(";") for r in f.read().splitlines()]
    last = dict(zip(rows[0], rows[-1]))
    ok, failed = int(last["SuccessfulCall(C)"]), int(last["FailedCall(C)"])
    elapsed = float(last["CurrentTime"].split("\t")[-1]) - float(last["StartTime"].split("\t")[-1])
    return ok, failed, ok / max(elapsed, 1e-3)


def verdict(rate, calls, ok, achieved):
    return (calls - ok) / calls < 0.001 and achieved >= 0.97 * rate


def anchor(rate, duration, scenario):
    out = subprocess.run([os.path.join(ANCHOR, "run.sh"), str(rate), str(duration), "2", scenario],
                         capture_output=True, text=True, timeout=duration + 180).stdout.strip()
    kv = dict(x.split("=", 1) for x in out.split() if "=" in x)
    return kv


def probe_visibility(probes):
    """REGISTER on peer 1 -> INVITE through peer 3 arrives at the contact, in ms."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    me = "%s:%d" % s.getsockname()
    out = []
    for i in range(probes):
        aor = f"vis{os.getpid()}x{i}"
        t0 = time.perf_counter()
        s.sendto((f"REGISTER sip:bench.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKr{i}\r\n"
                  f"Max-Forwards: 70\r\nFrom: <sip:{aor}@bench.example>;tag=r{i}\r\nTo: <sip:{aor}@bench.example>\r\n"
                  f"Call-ID: vr{i}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{aor}@{me}>\r\nExpires: 600\r\n"
                  f"Content-Length: 0\r\n\r\n").encode(), (f"{NET}.1", 5060))
        while True:
            data, _ = s.recvfrom(65536)
            if data.startswith(b"SIP/2.0 ") and f"branch=z9hG4bKr{i}\r\n".encode() in data:
                break
        assert data.startswith(b"SIP/2.0 200"), data[:80]
        n = 0
        while True:
            n += 1
            s.sendto((f"MESSAGE sip:{aor}@bench.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKm{i}n{n}\r\n"
                      f"Max-Forwards: 70\r\nFrom: <sip:probe@bench.example>;tag=m{i}\r\nTo: <sip:{aor}@bench.example>\r\n"
                      f"Call-ID: vm{i}n{n}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n").encode(), (f"{NET}.3", 5060))
            while True:
                data, _ = s.recvfrom(65536)
                if data.startswith(b"MESSAGE ") or f"branch=z9hG4bKm{i}n{n}\r\n".encode() in data:
                    break
            if data.startswith(b"MESSAGE "):
                out.append((time.perf_counter() - t0) * 1000)
                # Answer it, so the proxy stops retransmitting it.
                head = data.split(b"\r\n\r\n", 1)[0].decode()
                keep = [l for l in head.split("\r\n")[1:]
                        if l.split(":", 1)[0].lower() in ("via", "from", "to", "call-id", "cseq")]
                s.sendto(("SIP/2.0 200 OK\r\n" + "\r\n".join(keep) + "\r\nContent-Length: 0\r\n\r\n").encode(),
                         (f"{NET}.3", 5060))
                break
            # Not there yet: unknown (480 to an unauthenticated sender, which cannot tell
            # unknown users from unregistered ones; docs/security.md).
            assert data.startswith(b"SIP/2.0 480") or data.startswith(b"SIP/2.0 404"), data[:80]
            assert n < 10000
    s.close()
    out.sort()
    return out


def pct(v, q):
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="5000,8000,11000,14000,17000")
    ap.add_argument("--call-rates", default="800,1250,1600,2000")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--bindings", type=int, default=100000)
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the peers' logs and SIPp's files")
    a = ap.parse_args()
    for tool in ("sipp", "curl") + (() if a.skip_anchor else ("kamailio",)):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y sip-tester kamailio curl")
    if not os.access(BIN, os.X_OK):
        sys.exit("build first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="causeway-sip-bench-")
    results = {}
    try:
        c = Cluster(tmp)
        base = [0, 0]
        for kind, rates, scen in (("register", a.rates, "register"), ("calls", a.call_rates, "invite")):
            best = {"kamailio": 0, "causeway": 0}
            rows = []
            if kind == "calls":
                # 1000 callees on a SIPp UAS, registered through peer 1; calls through peer 2.
                with open(os.path.join(tmp, "callees.csv"), "w") as f:
                    f.write("SEQUENTIAL\n" + "".join(f"c{i}\n" for i in range(1000)))
                uas = start(["sipp", "-sf", os.path.join(ANCHOR, "uas.xml"), "-i", "127.0.0.1", "-p", "5082",
                             "-l", "100000", "-nostdin", "-timeout", "3600s"], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                ok, failed, _ = sipp_run(f"{NET}.1:5060", os.path.join(ANCHOR, "reg_callee.xml"), 500, 1000,
                                         os.path.join(tmp, "callees"), 5083,
                                         ("-inf", os.path.join(tmp, "callees.csv"), "-key", "uas_port", "5082"))
                assert ok == 1000, f"callee registration: {ok} ok, {failed} failed"
            for rate in [int(r) for r in rates.split(",") if r]:
                calls = rate * a.duration
                row = {"rate": rate}
                if not a.skip_anchor:
                    kv = anchor(rate, a.duration, scen)
                    row["kamailio"] = kv
                    if kv.get("verdict", "").startswith("PASS"):
                        best["kamailio"] = rate
                outdir = os.path.join(tmp, f"{kind}-{rate}")
                if kind == "register":
                    ok, failed, ach = sipp_run(f"{NET}.1:5060", os.path.join(ANCHOR, "register.xml"), rate, calls,
                                               outdir, 5081 + 10 * len(rows))
                else:
                    ok, failed, ach = sipp_run(f"{NET}.2:5060", os.path.join(ANCHOR, "uac_reg_invite.xml"), rate, calls,
                                               outdir, 5081 + 10 * len(rows),
                                               ("-inf", os.path.join(tmp, "callees.csv")))
                passed = verdict(rate, calls, ok, ach)
                row["causeway"] = {"ok": ok, "failed": failed, "fail_pct": round(100 * (calls - ok) / calls, 3),
                                   "achieved": round(ach), "verdict": "PASS" if passed else "FAIL"}
                if passed:
                    best["causeway"] = rate
                log(kind, json.dumps(row))
                rows.append(row)
            ratio = best["causeway"] / best["kamailio"] if best["kamailio"] else None
            results[kind] = {"rows": rows, "best": best, "ratio": ratio}
        vis = probe_visibility(a.probes)
        results["visibility_ms"] = {"n": len(vis), "p50": round(pct(vis, .5), 2), "p99": round(pct(vis, .99), 2),
                                    "max": round(vis[-1], 2)}
        log("visibility", results["visibility_ms"])
        rss0 = rss_kib(c.procs[1].pid)
        held0 = metric(c.dir(1), "causeway_sip_bindings") or 0
        rate = 5000
        ok, failed, _ = sipp_run(f"{NET}.1:5060", os.path.join(ANCHOR, "register.xml"), rate, a.bindings,
                                 os.path.join(tmp, "bindings"), 5091)
        held = metric(c.dir(1), "causeway_sip_bindings")
        rss1 = rss_kib(c.procs[1].pid)
        results["memory"] = {"bindings_added": int(held - held0), "rss_kib_before": rss0, "rss_kib_after": rss1,
                             "kib_per_100k": round((rss1 - rss0) * 100000 / max(1, held - held0))}
        log("memory", results["memory"])
        c.kill9(3)
        t0 = time.time()
        c.launch(3)
        while True:
            v = metric(c.dir(3), "causeway_sip_bindings")
            if v is not None and v >= held:
                break
            if time.time() - t0 > 120:
                raise SystemExit(f"peer 3 holds {v} of {held} bindings after 120 s")
            time.sleep(0.05)
        results["resync"] = {"bindings": int(held), "seconds": round(time.time() - t0, 2)}
        log("resync", results["resync"])
    finally:
        stop_all()
        if a.keep:
            log("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
