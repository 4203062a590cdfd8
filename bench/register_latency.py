#!/usr/bin/env python3
"""REGISTER response time under load: plain Kamailio (one node, in memory) and the Causeway
lab (3 peers, durable on a majority), same SIPp scenario and options as the anchors'
compare.py, one system at a time, fresh for each rate. Prints SIPp's response-time
repartition (ms buckets) and mean per system and rate.

Causeway's group commit starts a commit at most every `commit_interval` (10 ms) under load
(docs/replication.md, "The commit interval"): this shows what that costs in latency.

usage: flock /tmp/causeway-lab.lock python3 bench/register_latency.py [--rates 3000,11000]
          [--secs 10] [--causeway BIN] [--systems plain,causeway]
"""
import argparse, os, shutil, sys, tempfile

ANCHORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "anchors")
sys.path.insert(0, os.path.join(ANCHORS, "kamailio-dmq"))
import cluster as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="3000,11000")
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--causeway", default="target/release/causeway")
    ap.add_argument("--systems", default="plain,causeway")
    a = ap.parse_args()
    causeway = os.path.abspath(a.causeway)
    # The anchors measure SIP only; the lab's database cluster needs a directory the
    # postgres user can enter, which a mkdtemp directory is not.
    wrapper = None
    work = tempfile.mkdtemp(prefix="register-latency.")
    os.chmod(work, 0o755)
    try:
        wrapper = os.path.join(work, "causeway-sip-only")
        with open(wrapper, "w") as f:
            f.write('#!/bin/sh\nif [ "$1" = lab ] && [ "$2" = up ]; then shift 2; '
                    f'exec {causeway} lab up --no-database "$@"; fi\nexec {causeway} "$@"\n')
        os.chmod(wrapper, 0o755)
        systems = {"plain": lambda d: C.KamPlain(d, 2), "causeway": lambda d: C.CausewayLab(d, wrapper)}
        print(f"{'system':10} {'rate/s':>7} {'ok':>7} {'failed':>6} {'mean ms':>8}  repartition (ms: count)")
        for rate in [int(r) for r in a.rates.split(",") if r]:
            for name in [s for s in a.systems.split(",") if s]:
                d = os.path.join(work, f"{name}-{rate}")
                os.makedirs(d)
                s = systems[name](d)
                try:
                    s.start()
                    r = C.sipp_run(s.target(), rate, rate * a.secs, os.path.join(d, "sipp"), C.free_port())
                    rows = [x.split(";") for x in open(os.path.join(d, "sipp", "stat.csv")).read().splitlines() if x]
                    last = dict(zip(rows[0], rows[-1]))
                finally:
                    s.stop()
                mean = last.get("ResponseTime1(C)", "0:0:0:0").split(":")
                mean_ms = int(mean[2]) * 1000 + int(mean[3]) / 1000 if len(mean) == 4 else float("nan")
                buckets = [(k.split("_", 1)[1], int(v)) for k, v in last.items()
                           if k.startswith("ResponseTimeRepartition1_") and v.strip().isdigit() and int(v) > 0]
                print(f"{name:10} {rate:>7} {r['ok']:>7} {r['failed']:>6} {mean_ms:>8.1f}  "
                      + ", ".join(f"{b}: {n}" for b, n in buckets))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
