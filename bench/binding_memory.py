#!/usr/bin/env python3
"""Resident memory per registered binding on the accepting peer (issue 16: goal <= 1 KB).

usage: flock /tmp/causeway-lab.lock bench/binding_memory.py [--bindings N] [--rate R]
                                                          [--settle S] [--keep]
       (CAUSEWAY_BIN=path: another build than target/release/causeway)

Starts a 3-peer Causeway cluster of the release binary (127.0.50.1-3, TLS Enforce, as
bench/sip.py does), registers 2,000 warm-up bindings through peer 1 (so first-use costs
are paid before the measure), reads every peer's RSS (/proc/PID/status VmRSS), registers
N more (SIPp, ../shared/anchors/kamailio/register.xml: one REGISTER per call, a unique AOR
each, Expires 3600) at R REGISTER/s through peer 1, waits until peer 1 counts them, and
reads the RSS again: at once, and after S seconds (answered SIP transactions are held for
32 s after their answer, so the later figure is what the bindings themselves hold).
Prints bytes of RSS per binding for each peer (peer 1 accepted them; peers 2 and 3 hold
the replicated copy), and the machine it ran on, as JSON on stdout.
Needs: apt-get install -y sip-tester curl; cargo build --release.
"""
import argparse, importlib.util, json, os, platform, shutil, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("causeway_sip_bench", os.path.join(HERE, "sip.py"))
sipbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sipbench)
# CAUSEWAY_BIN=path measures another build (a copy of an earlier one, to compare).
sipbench.BIN = os.environ.get("CAUSEWAY_BIN", sipbench.BIN)


def machine():
    info = {"kernel": platform.release(), "cpus": os.cpu_count()}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        info["mem_total_kib"] = int(f.readline().split()[1])
    st = os.stat(sipbench.BIN)
    info["binary"] = {"path": sipbench.BIN, "bytes": st.st_size,
                      "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.st_mtime))}
    info["load_avg_at_start"] = os.getloadavg()
    return info


def bindings(c):
    return int(sipbench.metric(c.dir(1), "causeway_sip_bindings") or 0)


def wait_bindings(c, want, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if bindings(c) >= want:
            return
        time.sleep(0.5)
    raise SystemExit(f"peer 1 holds {bindings(c)} bindings, not {want}, after {timeout} s")


def register(c, tmp, n, rate, port, name):
    ok, failed, achieved = sipbench.sipp_run(f"{sipbench.NET}.1:5060",
                                              os.path.join(sipbench.ANCHOR, "register.xml"), rate, n,
                                              os.path.join(tmp, name), port)
    sipbench.log(f"{name}: {ok} ok, {failed} failed, {achieved:.0f}/s")
    return ok


def rss(c):
    return {k: sipbench.rss_kib(p.pid) for k, p in sorted(c.procs.items())}


def store_kib(c):
    return os.path.getsize(os.path.join(c.dir(1), "node.redb")) // 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bindings", type=int, default=100000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--settle", type=int, default=40, help="seconds to wait before the second reading")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    for tool in ("sipp", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y sip-tester curl")
    if not os.access(sipbench.BIN, os.X_OK):
        sys.exit("build first: cargo build --release")
    out = {"machine": machine(), "bindings_requested": a.bindings, "rate": a.rate}
    tmp = tempfile.mkdtemp(prefix="causeway-binding-memory-")
    try:
        c = sipbench.Cluster(tmp)
        # Warm-up: every code path and pool touched once, then idle so transactions go.
        warm = register(c, tmp, 2000, 1000, 5101, "warmup")
        wait_bindings(c, warm)
        time.sleep(a.settle)
        held0 = bindings(c)
        rss0 = rss(c)
        store0 = store_kib(c)
        ok = register(c, tmp, a.bindings, a.rate, 5111, "bindings")
        wait_bindings(c, held0 + ok)
        time.sleep(2)
        held1 = bindings(c)
        rss1 = rss(c)
        time.sleep(a.settle)
        rss2 = rss(c)
        added = held1 - held0
        out["bindings_added"] = added
        out["rss_kib"] = {"before": rss0, "after": rss1, f"after_{a.settle}s": rss2}
        out["bytes_per_binding"] = {
            f"peer{k}": {"at_once": round((rss1[k] - rss0[k]) * 1024 / max(1, added)),
                         f"after_{a.settle}s": round((rss2[k] - rss0[k]) * 1024 / max(1, added))}
            for k in rss0}
        out["store_file_kib_peer1"] = {"before": store0, "after": store_kib(c)}
        out["transactions_held_peer1"] = sipbench.metric(c.dir(1), "causeway_sip_transactions")
    finally:
        sipbench.stop_all()
        if a.keep:
            sipbench.log("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
