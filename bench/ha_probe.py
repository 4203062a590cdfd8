#!/usr/bin/env python3
"""Probe a virtual IP with SIP OPTIONS over UDP every INTERVAL seconds (run inside the
client namespace); write one line per probe: send time (CLOCK_MONOTONIC, s), answered (0/1),
answer delay (ms), and which address answered.

  ha_probe.py HOST PORT INTERVAL_S COUNT OUTFILE

A probe counts as answered when its 200 arrives within 100 ms, as in the keepalived anchor
(../shared/anchors/keepalived/failover.py).
"""
import socket, sys, time, select

host, port, interval, count, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
s.setblocking(False)
local = "%s:%d" % s.getsockname()
sent = {}
answers = {}
start = time.clock_gettime(time.CLOCK_MONOTONIC)
for i in range(count):
    due = start + i * interval
    while True:
        now = time.clock_gettime(time.CLOCK_MONOTONIC)
        if now >= due:
            break
        r, _, _ = select.select([s], [], [], due - now)
        if r:
            try:
                data, src = s.recvfrom(4096)
            except BlockingIOError:
                continue
            t = time.clock_gettime(time.CLOCK_MONOTONIC)
            for line in data.split(b"\r\n"):
                if line.lower().startswith(b"call-id:"):
                    n = int(line.split(b":")[1].strip().split(b"@")[0].split(b"-")[1])
                    answers.setdefault(n, (t, src[0]))
    msg = ("OPTIONS sip:%s SIP/2.0\r\nVia: SIP/2.0/UDP %s;branch=z9hG4bK-p%d\r\nMax-Forwards: 70\r\n"
           "From: <sip:probe@%s>;tag=p\r\nTo: <sip:%s>\r\nCall-ID: p-%d@probe\r\nCSeq: 1 OPTIONS\r\n"
           "Content-Length: 0\r\n\r\n") % (host, local, i, host, host, i)
    sent[i] = time.clock_gettime(time.CLOCK_MONOTONIC)
    try:
        s.sendto(msg.encode(), (host, port))
    except OSError:
        pass
# Drain the last answers.
end = time.clock_gettime(time.CLOCK_MONOTONIC) + 0.2
while time.clock_gettime(time.CLOCK_MONOTONIC) < end:
    r, _, _ = select.select([s], [], [], 0.01)
    if r:
        data, src = s.recvfrom(4096)
        t = time.clock_gettime(time.CLOCK_MONOTONIC)
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"call-id:"):
                n = int(line.split(b":")[1].strip().split(b"@")[0].split(b"-")[1])
                answers.setdefault(n, (t, src[0]))
with open(out, "w") as f:
    for i in range(count):
        a = answers.get(i)
        ok = a is not None and (a[0] - sent[i]) <= 0.1
        f.write("%.6f %d %.3f %s\n" % (sent[i], 1 if ok else 0, (a[0] - sent[i]) * 1000 if a else -1, a[1] if a else "-"))
