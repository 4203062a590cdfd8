#!/usr/bin/env python3
"""Web pages benchmark (issue 15): every page answers in < 50 ms p99 with 100,000
registrations in the cluster.

usage: bench/web_pages.py [--bindings N] [--warmup N] [--requests N] [--rate R] [--keep]
                          [--goal-ms MS] [--insecure]

Starts a 3-peer Causeway cluster (127.0.52.1-3, TLS Enforce, HTTPS admin port
127.0.52.k:8443), sets an admin password on peer 1, registers --bindings unique AORs
(user0 … user<N-1>@bench.example, Expires 3600) with SIPp, spread over the 3 peers, waits
until peers 1 and 3 hold them all (metric causeway_sip_bindings), logs in on peer 1's
pages over HTTPS (certificate verified against the cluster's ca.crt, server name = the
peer's IP; --insecure skips verification) and, on one keep-alive connection, GETs each
page --warmup times, then --requests times timed (request sent -> whole body read).
Every answer must be 200 and hold the page's marker (a login redirect does not count).
Then it times the JSON API behind the registrations page on peer 1's admin socket, to
tell the node's work from the page's. Prints a table; exits 1 if a p99 >= --goal-ms.
Traffic goes only to 127.0.0.0/8; every process started is stopped by PID at the end.
Needs: apt-get install -y sip-tester curl; cargo build --release.
"""
import argparse, glob, http.client, json, os, platform, re, shutil, signal, socket, ssl
import subprocess, sys, tempfile, time, urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The process bookkeeping and the metric reader are sip.py's (one list of what was started).
from sip import log, metric, start, stop_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "causeway")
NET = "127.0.52"
SIPP_IP = f"{NET}.100"  # SIPp's own address; peers are .1-.3
SIPP_PORT = 5201  # + peer index - 1
PASSWORD = "bench-web-pages-pw"

# SIPp scenario: one REGISTER per call, the AOR from the injection file, Expires 3600
# (outlives the run). Same shape as ../shared/anchors/kamailio/register.xml.
SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="register-csv">
  <send retrans="500">
    <![CDATA[
      REGISTER sip:bench.example SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:[field0]@bench.example>;tag=[pid]T[call_number]
      To: <sip:[field0]@bench.example>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Expires: 3600
      User-Agent: sipp-web-bench
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" timeout="5000"/>
</scenario>
"""


def cli(node_dir, *args, stdin=None):
    return subprocess.run([BIN, "--node", node_dir, *args], capture_output=True, text=True,
                          timeout=60, input=stdin)


def proc_stat(pid):
    """(RSS KiB, CPU seconds used so far)."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Cluster:
    def __init__(self, tmp, n=3):
        self.tmp, self.n, self.procs = tmp, n, {}
        ca = os.path.join(tmp, "ca")
        self.ca_crt = os.path.join(ca, "ca.crt")
        subprocess.run([BIN, "pki", "ca", "init", "--dir", ca], check=True, capture_output=True)
        peers = ", ".join(f'"{NET}.{k}"' for k in range(1, n + 1))
        for k in range(1, n + 1):
            d = self.dir(k)
            os.makedirs(d)
            subprocess.run([BIN, "pki", "csr", "node", f"CN:{NET}.{k}"], cwd=d, check=True, capture_output=True)
            subprocess.run([BIN, "pki", "sign", "node.csr", "--ca-dir", ca], cwd=d, check=True, capture_output=True)
            shutil.copy(self.ca_crt, d)
            with open(os.path.join(d, "causeway.toml"), "w") as f:
                f.write(f'[node]\nsystem_name = "peer{k}"\naddress = "{NET}.{k}"\ndata_dir = "{d}"\n\n'
                        f'[cluster]\nname = "bench.example"\ntls_verification = "Enforce"\npeers = [{peers}]\n\n'
                        f'[sip]\nrate_per_source = 100000\n\n'
                        f'[admin]\nhttps_listen = "{NET}.{k}:8443"\n')
        r = cli(self.dir(1), "admin", "passwd", "admin", stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
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


def register(c, tmp, n, rate):
    """n unique AORs user0..user<n-1>, user i through peer (i % 3) + 1, one SIPp per peer,
    all three at once. Re-registering the same AOR and contact refreshes the same binding,
    so a short pass is simply run again (at most 3 passes)."""
    scen = os.path.join(tmp, "register.xml")
    with open(scen, "w") as f:
        f.write(SCENARIO)
    for attempt in range(3):
        runs = []
        for k in range(1, c.n + 1):
            ids = range(k - 1, n, c.n)
            out = os.path.join(tmp, f"sipp{k}-{attempt}")
            os.makedirs(out)
            csv = os.path.join(out, "aors.csv")
            with open(csv, "w") as f:
                f.write("SEQUENTIAL\n" + "".join(f"user{i};\n" for i in ids))
            calls, r = len(ids), max(1, rate // c.n)
            limit = calls // r + 60
            p = start(["timeout", str(limit + 30), "sipp", f"{NET}.{k}:5060", "-sf", scen, "-inf", csv,
                       "-i", SIPP_IP, "-p", str(SIPP_PORT + k - 1), "-r", str(r), "-m", str(calls),
                       "-l", str(max(1000, r * 6)), "-timeout", f"{limit}s", "-nostdin",
                       "-trace_stat", "-stf", "stat.csv", "-fd", "1"],
                      cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs.append((k, p, out))
        for k, p, out in runs:
            p.wait()
            try:
                with open(os.path.join(out, "stat.csv")) as f:
                    rows = [r.split(";") for r in f.read().splitlines()]
                last = dict(zip(rows[0], rows[-1]))
                log(f"sipp peer {k} pass {attempt + 1}: ok {last['SuccessfulCall(C)']} failed {last['FailedCall(C)']}")
            except (OSError, IndexError, KeyError):
                log(f"sipp peer {k} pass {attempt + 1}: no statistics (exit {p.returncode})")
        if wait_bindings(c, n, 30):
            return
    raise SystemExit(f"the cluster does not hold {n} bindings after 3 passes")


def wait_bindings(c, n, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        held = {k: metric(c.dir(k), "causeway_sip_bindings") for k in (1, 3)}
        if all(v is not None and v >= n for v in held.values()):
            log(f"bindings held: {held}")
            return True
        time.sleep(0.5)
    log(f"bindings held: {held} (want {n})")
    return False


class Web:
    """One keep-alive HTTPS connection with the session cookie."""

    def __init__(self, host, ca_crt, insecure):
        if insecure:
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=ca_crt)  # checks the IP SAN against host
        self.host, self.ctx, self.cookies = host, ctx, {}
        self.conn = http.client.HTTPSConnection(host, 8443, context=ctx, timeout=30)

    def request(self, method, path, body=None, headers=None):
        h = dict(headers or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        self.conn.request(method, path, body=body, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        for v in r.headers.get_all("Set-Cookie") or []:
            name, _, rest = v.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.cookies[name.strip()] = value
            else:
                self.cookies.pop(name.strip(), None)
        return r.status, r.headers, data

    def login(self, user, password):
        status, _, body = self.request("GET", "/login")
        assert status == 200, status
        token = re.search(rb'name="login_token" value="([^"]+)"', body).group(1).decode()
        assert self.cookies.get("causeway_login") == token, (self.cookies, token)
        form = urllib.parse.urlencode({"user": user, "password": password, "login_token": token})
        status, headers, body = self.request("POST", "/login", form,
                                             {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 303 and headers.get("Location") == "/ui/overview", (status, body[:300])
        assert "causeway_session" in self.cookies, self.cookies


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def pages(n):
    """(path, markers the body must hold)."""
    rows = n  # all bindings match an empty query
    last = max(1, -(-rows // 50))
    deep = min(1000, last - 1)  # page 1000 (rows 50,000-50,049) with 100,000 bindings
    term = f"user{5000 if n > 5000 else n // 2}"
    q_hits = sum(1 for i in range(n) if term in f"user{i}@")
    return [
        ("/ui/overview", [b'id="peer-1"', b'id="peer-3"', f"{n} bindings".encode()]),
        ("/ui/overview/live", [b'id="peer-1"', b'id="peer-3"', f"{n} bindings".encode()]),
        ("/ui/clustering", [b"Cluster name", b'value="bench.example"']),
        ("/ui/alarms", [b"History on this peer"]),
        ("/ui/alarms/live", [b"History on this peer"]),
        ("/ui/registrations?page=0", [b":user0@bench.example</td>" if n else b"",
                                      f"Page 1 of {last} ({rows} rows)".encode()]),
        (f"/ui/registrations?q=&peer=&page={deep}", [b"<td>Peer ",
                                                    f"Page {deep + 1} of {last} ({rows} rows)".encode()]),
        (f"/ui/registrations?q={term}&peer=&page=0", [f":{term}@bench.example</td>".encode(),
                                                       f"({q_hits} rows)".encode()]),
        ("/ui/calls", [b"Calls in the cluster"]),
        ("/ui/configuration", [b'id="item-sip.domains"']),
    ]


def measure(web, path, markers, warmup, requests):
    times, size = [], 0
    for i in range(warmup + requests):
        t0 = time.perf_counter()
        status, _, body = web.request("GET", path)
        dt = (time.perf_counter() - t0) * 1000
        if status != 200 or not all(m in body for m in markers):
            missing = [m.decode() for m in markers if m not in body]
            raise SystemExit(f"{path}: answer {status}, missing {missing}: {body[:400]!r}")
        if i >= warmup:
            times.append(dt)
            size = len(body)
    return times, size


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("peer", timeout=30)
        self.sock_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.sock_path)


def api_profile(node_dir, paths, runs=50):
    """The JSON API the pages are drawn from, on the admin socket (no TLS, no page)."""
    conn = UnixHTTP(os.path.join(node_dir, "admin.sock"))
    out = []
    for path in paths:
        times, size = [], 0
        for i in range(5 + runs):
            t0 = time.perf_counter()
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            dt = (time.perf_counter() - t0) * 1000
            assert r.status == 200, (path, r.status, body[:200])
            if i >= 5:
                times.append(dt)
                size = len(body)
        out.append((path, pct(times, .5), pct(times, .99), max(times), size))
    conn.close()
    return out


def perf_profile(tmp, pid, node_dir, path, runs=40):
    """perf's flat profile of peer 1 (self time by symbol) while `path` is asked `runs` times."""
    data = os.path.join(tmp, "perf.data")
    rec = start(["timeout", "120", "perf", "record", "-F", "1999", "-p", str(pid), "-o", data],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    api_profile(node_dir, [path], runs)
    rec.send_signal(signal.SIGINT)
    rec.wait(timeout=30)
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "symbol",
                          "--percent-limit", "2"], capture_output=True, text=True, timeout=120).stdout
    lines = [l for l in out.splitlines() if l.strip() and not l.startswith("#")]
    return [re.sub(r"\s+", " ", l.strip())[:150] for l in lines[:12]]


def build_check():
    if not os.access(BIN, os.X_OK):
        sys.exit("target/release/causeway is missing: run `cargo build --release` first")
    built = os.path.getmtime(BIN)
    newer = [p for p in glob.glob(os.path.join(ROOT, "crates", "**", "*.rs"), recursive=True)
             if os.path.getmtime(p) > built]
    if newer:
        log(f"warning: target/release/causeway is older than {len(newer)} source file(s) "
            f"(e.g. {os.path.relpath(newer[0], ROOT)}): run `cargo build --release` to measure them")
    return newer


def machine():
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = m.group(1).strip() if m else ""
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{model}, nproc {nproc}, {platform.system()} {platform.release()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bindings", type=int, default=100000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=int, default=6000, help="REGISTERs/s, all SIPp together")
    ap.add_argument("--goal-ms", type=float, default=50.0)
    ap.add_argument("--insecure", action="store_true", help="do not verify the HTTPS certificate")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, SIPp files)")
    ap.add_argument("--perf", action="store_true", help="also profile peer 1 with perf while the "
                    "registrations API answers (needs perf)")
    a = ap.parse_args()
    for tool in ("sipp", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y sip-tester curl")
    stale = build_check()
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "load_before": loadavg(),
            "binary": time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(BIN))),
            "stale_sources": len(stale)}
    tmp = tempfile.mkdtemp(prefix="causeway-web-bench-")
    results, failed = [], []
    try:
        c = Cluster(tmp)
        t0 = time.time()
        register(c, tmp, a.bindings, a.rate)
        info["register_s"] = round(time.time() - t0, 1)
        pid = c.procs[1].pid
        rss0, cpu0 = proc_stat(pid)
        web = Web(f"{NET}.1", c.ca_crt, a.insecure)
        web.login("admin", PASSWORD)
        info["tls"] = "unverified context" if a.insecure else "verified against the cluster ca.crt, server name = IP"
        info["load_start"] = loadavg()
        t1 = time.time()
        for path, markers in pages(a.bindings):
            times, size = measure(web, path, markers, a.warmup, a.requests)
            row = (path, pct(times, .5), pct(times, .99), max(times), size)
            log("%-44s p50 %7.2f  p99 %7.2f  max %7.2f ms  %7d B" % row)
            results.append(row)
            if row[2] >= a.goal_ms:
                failed.append(path)
        wall = time.time() - t1
        rss1, cpu1 = proc_stat(pid)
        info["peer1_rss_mib"] = round(rss1 / 1024)
        info["peer1_cpu_s_during_pages"] = round(cpu1 - cpu0, 2)
        info["peer1_cpu_pct_of_one_core"] = round(100 * (cpu1 - cpu0) / wall, 1)
        info["pages_wall_s"] = round(wall, 1)
        info["load_after"] = loadavg()
        info["bindings"] = {k: metric(c.dir(k), "causeway_sip_bindings") for k in (1, 2, 3)}
        api = api_profile(c.dir(1), [
            "/metrics",
            "/api/v1/status/registrations?peer=9&limit=0",
            "/api/v1/status/registrations?limit=0",
            "/api/v1/status/registrations?limit=50&offset=0",
            "/api/v1/status/registrations?limit=50&offset=50000",
            "/api/v1/status/registrations?q=user5000&limit=50&offset=0",
            "/api/v1/status/calls?limit=0",
            "/api/v1/status/cluster",
            "/api/v1/status/alarms",
            "/api/v1/configuration",
        ])
        profiles = {}
        if a.perf and shutil.which("perf"):
            for path in ("/api/v1/status/registrations?limit=0",
                         "/api/v1/status/registrations?limit=50&offset=50000"):
                profiles[path] = perf_profile(tmp, pid, c.dir(1), path)
    finally:
        stop_all()
        if a.keep:
            log("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Web pages on peer 1 with {a.bindings} registrations; {a.warmup} warm-up + {a.requests} "
          f"timed GETs each, one keep-alive HTTPS connection")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print("\n| page | p50 ms | p99 ms | max ms | bytes |\n|---|---:|---:|---:|---:|")
    for path, p50, p99, mx, size in results:
        print(f"| `{path}` | {p50:.2f} | {p99:.2f} | {mx:.2f} | {size} |")
    print("\nJSON API on peer 1's admin socket (50 GETs each, keep-alive):")
    print("\n| API | p50 ms | p99 ms | max ms | bytes |\n|---|---:|---:|---:|---:|")
    for path, p50, p99, mx, size in api:
        print(f"| `{path}` | {p50:.2f} | {p99:.2f} | {mx:.2f} | {size} |")
    for path, lines in profiles.items():
        print(f"\nperf, peer 1, self time while {path} is asked:")
        for l in lines:
            print("   ", l)
    if failed:
        print(f"\nFAIL: p99 >= {a.goal_ms} ms: {', '.join(failed)}")
        sys.exit(1)
    print(f"\nPASS: every page p99 < {a.goal_ms} ms")


if __name__ == "__main__":
    main()
