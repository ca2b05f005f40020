#!/usr/bin/env python3
"""Network COLO benchmarks: netsrv's counter service from the lab's client
namespace, one long TCP connection, one request in flight at a time.

    .venv/bin/python benchmarks/bench_netcolo.py [--requests 3000]

Rows: request latency p50/p99 and requests/s for a plain `kvmcolo run` on
the same LAN path (client -> LAN bridge -> hostA bridge -> tap), COLO with
compare at the default --checkpoint-delay 100, COLO with only compare-driven
checkpoints (delay 60 s: the steady state the comparator alone causes), and
a guest that diverges on every 100th reply, and four concurrent clients of
the one shared counter (the guests may serve them in different orders: real
divergence); the share of checkpoints by reason, mismatch checkpoints per
1,000 requests, and how long the primary's output waited for the
secondary's.  Needs root.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kvmcolo import control, lab  # noqa: E402
from report import pct, print_table  # noqa: E402
from vmm_process import GuestProcess  # noqa: E402


def measure(ns, n: int) -> tuple[list[float], float]:
    """n sequential requests on one connection (after a warm-up); replies may
    carry netsrv's diverge suffix, so lines are read raw."""
    with ns.entered():
        s = socket.create_connection((lab.GUEST_ADDR, lab.COUNTER_PORT), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat, buf = [], b""
    try:
        for i in range(200 + n):  # warm up: ARP, the guest's TCP, caches
            if i == 200:
                t0 = time.perf_counter()
            sent = time.perf_counter()
            s.sendall(b"\n")
            while b"\n" not in buf:
                chunk = s.recv(256)
                if not chunk:
                    raise SystemExit("the guest closed the connection")
                buf += chunk
            buf = buf.split(b"\n", 1)[1]
            if i >= 200:
                lat.append(time.perf_counter() - sent)
        return lat, n / (time.perf_counter() - t0)
    finally:
        s.close()


def plain(the_lab: lab.Lab, n: int) -> tuple[list[float], float]:
    sd = lab.SIDES["A"]
    g = GuestProcess(the_lab.host_a.cmd(*lab.kvmcolo_command(), "run", "--image", lab.GUEST_IMAGE, "--net",
                                        f"tap={sd['tap']},bridge={sd['bridge']}", "--", f"ip={lab.GUEST_ADDR}"))  # fmt: skip
    try:
        g.wait_line("netsrv: ready", timeout=60)
        return measure(the_lab.client, n)
    finally:
        g.stop()


def concurrent(the_lab: lab.Lab, clients: int, seconds: float) -> tuple[int, bool]:
    """`clients` counter clients at once (150 requests/s each): (replies, whether
    together they saw exactly 1..N)."""
    cs = [lab.CounterClient(the_lab.client) for _ in range(clients)]
    try:
        for c in cs:
            c.start(150)
        time.sleep(seconds)
        for c in cs:
            c.stop()
        values = sorted(v for c in cs for v in c.values())
        return len(values), values == list(range(values[0], values[0] + len(values)))
    finally:
        for c in cs:
            c.close()


def colo(the_lab: lab.Lab, tmp: str, workload, primary=(), guest_args=()) -> tuple[object, dict, float]:
    """Run `workload()` against netsrv under COLO: (its result, checkpoints by
    reason during it, the comparator's hold p50 in ms afterwards)."""
    pair = lab.ColoLab(the_lab, tmp, lambda side, argv: GuestProcess(argv))
    socks = {s: pair.sock(s) for s in "ab"}
    try:
        pair.start_pair(primary, guest_args=guest_args)
        pair.procs["A"].wait_line("netsrv: ready", timeout=60)
        before = control.call(socks["a"], "query-colo")["reasons"]
        result = workload()
        info = control.call(socks["a"], "query-colo")
        after = info["reasons"]
        reasons = {r: after[r] - before.get(r, 0) for r in after if after[r] - before.get(r, 0)}
        return result, reasons, info["net"]["nics"][0]["hold_ms_p50"]
    finally:
        pair.stop()


def row(name: str, lat: list[float], rate: float, base: list[float] | None = None) -> tuple[str, str, str]:
    p50, p99 = pct(lat, 0.5) * 1e6, pct(lat, 0.99) * 1e6
    added = f", +{p50 - pct(base, 0.5) * 1e6:.0f} µs p50 over plain" if base else ""
    return (name, f"{p50:.0f} µs p50", f"p99 {p99:.0f} µs, {rate:.0f} requests/s{added}")


def share(reasons: dict, n: int, hold: float) -> str:
    total = sum(reasons.values()) or 1
    parts = ", ".join(f"{r} {c} ({100 * c / total:.0f}%)" for r, c in sorted(reasons.items()))
    mismatch = sum(c for r, c in reasons.items() if r.startswith("net-mismatch"))
    return (f"{parts or 'none'}; {1000 * mismatch / n:.1f} mismatch checkpoints per 1,000 requests; "
            f"primary output held for the secondary's p50 {hold} ms")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    n = args.requests
    rows = []
    with lab.Lab("bn") as the_lab, tempfile.TemporaryDirectory() as tmp:
        base, rate = plain(the_lab, n)
        rows.append(row("plain kvmcolo run", base, rate))
        sequential = lambda: measure(the_lab.client, n)  # noqa: E731
        for name, primary, guest_args in (
            ("COLO + compare, checkpoint every 100 ms", [], []),
            ("COLO + compare, compare-driven only", ["--checkpoint-delay", "60000"], []),
            ("COLO, guest diverges every 100th reply", [], ["diverge=100"]),
        ):
            (lat, rate), reasons, hold = colo(the_lab, tmp, sequential, primary, guest_args)
            rows.append(row(name, lat, rate, base))
            rows.append(("  checkpoints by reason", f"{sum(reasons.values())}", share(reasons, n, hold)))
        (replies, consistent), reasons, hold = colo(the_lab, tmp, lambda: concurrent(the_lab, 4, 8))
        rows.append(("COLO, 4 concurrent clients of the shared counter", f"{replies} replies",
                     "together exactly 1..N" if consistent else "INCONSISTENT: a value lost or repeated"))  # fmt: skip
        rows.append(("  checkpoints by reason", f"{sum(reasons.values())}", share(reasons, replies, hold)))
    print_table(rows, figure_width=14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
