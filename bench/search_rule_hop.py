#!/usr/bin/env python3
"""What a search-rule hop to a neighbour zone costs the accepting peer, per call.

usage: bench/search_rule_hop.py [--rate 800] [--calls 8000] [--rounds 5]

A 3-peer cluster (sip.py's: 127.0.50.1-3, TLS Enforce). One SIPp UAS on 127.0.0.1:5082
(crates/causeway/tests/sip/neighbour.xml) answers every INVITE and the zone's keep-alive. The same SIPp UAC scenario (the Kamailio anchor's uac_reg_invite.xml:
REGISTER, INVITE, ACK, BYE per call) runs through peer 1 in two ways, alternately, --rounds
times each, back to back:
  local: to c<i>, registered in the cluster with the UAS as contact (location lookup);
  zone:  to n<i>, which no binding takes: search rule `n* trunk` sends it to zone trunk,
         whose address is the same UAS.
Everything else is the same (the REGISTER of each call, the proxying of INVITE/ACK/BYE and
their answers), so the difference of peer 1's CPU time (utime+stime from /proc) per call is
what the rule lookup and the zone hop cost: the median over the rounds of each round's
difference. The goal (issue 16) is < 50 us per call.
Traffic only to 127.0.0.0/8; every process started is stopped by PID.
Needs: apt-get install -y sip-tester; cargo build --release.
"""
import argparse, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sip import ANCHOR, BIN, NET, Cluster, cli, log, sipp_run, start, stop_all  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=800)
    ap.add_argument("--calls", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not shutil.which("sipp"):
        sys.exit("sipp is missing: apt-get install -y sip-tester")
    if not os.access(BIN, os.X_OK):
        sys.exit("build first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="causeway-hop-bench-")
    results = {"machine": f"{platform.node()} {os.cpu_count()} cores {platform.release()}",
               "rate": a.rate, "calls": a.calls, "rounds": []}
    try:
        c = Cluster(tmp)
        for path, value in (("routing.rules.10", "n* trunk"), ("zones.trunk.address", "127.0.0.1:5082")):
            r = cli(c.dir(1), "xconfiguration", "set", path, value)
            assert r.returncode == 0, r.stderr
        n = 1000
        for name, prefix in (("local", "c"), ("zone", "n")):
            with open(os.path.join(tmp, f"{name}.csv"), "w") as f:
                f.write("SEQUENTIAL\n" + "".join(f"{prefix}{i}\n" for i in range(n)))
        uas = os.path.join(os.path.dirname(BIN), "..", "..", "crates", "causeway", "tests", "sip", "neighbour.xml")
        start(["sipp", "-sf", uas, "-i", "127.0.0.1", "-p", "5082",
               "-l", "100000", "-nostdin", "-timeout", "3600s"], cwd=tmp,
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ok, failed, _ = sipp_run(f"{NET}.1:5060", os.path.join(ANCHOR, "reg_callee.xml"), 500, n,
                                 os.path.join(tmp, "callees"), 5083,
                                 ("-inf", os.path.join(tmp, "local.csv"), "-key", "uas_port", "5082"))
        assert ok == n, f"callee registration: {ok} ok, {failed} failed"
        located = cli(c.dir(1), "xcommand", "Locate", "n1").stdout
        assert "zone trunk" in located, located
        pid = c.procs[1].pid
        per_call = {"local": [], "zone": []}
        port = 5100
        for rnd in range(a.rounds):
            for name in ("local", "zone"):
                port += 10
                before = cpu_seconds(pid)
                ok, failed, ach = sipp_run(f"{NET}.1:5060", os.path.join(ANCHOR, "uac_reg_invite.xml"),
                                           a.rate, a.calls, os.path.join(tmp, f"{name}-{rnd}"), port,
                                           ("-inf", os.path.join(tmp, f"{name}.csv")))
                time.sleep(1)  # the replication that trails the last answer
                used = cpu_seconds(pid) - before
                us = used * 1e6 / max(ok, 1)
                per_call[name].append(us)
                row = {"round": rnd, "path": name, "ok": ok, "failed": failed, "achieved": round(ach),
                       "cpu_s": round(used, 3), "us_per_call": round(us, 1)}
                results["rounds"].append(row)
                log(json.dumps(row))
                assert failed == 0, f"{name}: {failed} calls failed"
        # Each round's two runs are back to back: their difference cancels what drifts over
        # the run (the bindings accumulating, other work on the machine).
        hops = [z - l for l, z in zip(per_call["local"], per_call["zone"])]
        results["median_us_per_call"] = {"local": round(statistics.median(per_call["local"]), 1),
                                         "zone": round(statistics.median(per_call["zone"]), 1),
                                         "hop_per_round": [round(h, 1) for h in hops],
                                         "hop": round(statistics.median(hops), 1)}
        log("median", results["median_us_per_call"])
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
