#!/usr/bin/env python3
"""COLO benchmarks between two namespaced hosts (a veth replication link),
256 MiB guest running the `dirty` workload.

    .venv/bin/python benchmarks/bench_colo.py [--seconds 6]

Per working-set size: checkpoints per second at --checkpoint-delay 100,
primary pause (median/p99), transfer MB/s, secondary load time; guest
slowdown (passes/s under COLO vs plain `kvmcolo run`) at 1,000 dirty pages;
pause with and without resuming the primary before the transfer; failover
time from SIGKILL of the primary to the secondary running alone (default
heartbeat settings).  Needs root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from colo_pair import ColoPair, passes  # noqa: E402
from report import pct, print_table  # noqa: E402
from vmm_process import GuestProcess, kvmcolo_exe  # noqa: E402

VM = ["--image", "dirty", "--mem", "256M"]


def pass_rate(proc: GuestProcess, seconds: float) -> float:
    proc.wait_line(r"dirty: pass=\d+ ok", timeout=30)
    p0, t0 = max(passes(proc.lines)), time.monotonic()
    time.sleep(seconds)
    p1, t1 = max(passes(proc.lines)), time.monotonic()
    return (p1 - p0) / (t1 - t0)


def plain_rate(pages: int, seconds: float, neighbour: bool = False) -> float:
    """Passes/s of a plain `kvmcolo run`; with `neighbour`, next to a second
    busy guest — what the secondary is on this one 2-core machine."""
    other = GuestProcess([kvmcolo_exe(), "run", *VM, "--", f"pages={pages}", "report=1000000"]) if neighbour else None
    g = GuestProcess([kvmcolo_exe(), "run", *VM, "--", f"pages={pages}", "report=20"])
    try:
        return pass_rate(g, seconds)
    finally:
        g.stop()
        if other:
            other.stop()


def colo_run(pages: int, seconds: float, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pair = ColoPair(Path(tmp), VM, [f"pages={pages}", "report=20"],
                        primary_args=["--checkpoint-delay", "100", *extra])  # fmt: skip
        try:
            c0 = pair.colo("a")["checkpoints"]
            t0 = time.monotonic()
            rate = pass_rate(pair.primary, seconds)
            a = pair.colo("a")
            b = pair.colo("b")
            elapsed = time.monotonic() - t0
            recent = a["recent"]
            return {
                "cps": (a["checkpoints"] - c0) / elapsed,
                "pause_p50": statistics.median(r["pause_ms"] for r in recent),
                "pause_p99": pct([r["pause_ms"] for r in recent], 0.99),
                "pages": statistics.median(r["dirty_pages"] for r in recent),
                "mbs": statistics.median(r["bytes"] / r["transfer_ms"] / 1e3 for r in recent),
                "transfer_ms": statistics.median(r["transfer_ms"] for r in recent),
                "load_ms": statistics.median(r["load_ms"] for r in b["recent"]),
                "rate": rate,
            }
        finally:
            pair.close()


def failover_time(cut_link: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        pair = ColoPair(Path(tmp), VM, ["pages=1000", "report=20"])
        try:
            pair.wait_checkpoints(Path(tmp) / "a.sock", 5)
            t_kill = time.time()
            if cut_link:
                pair.cut_link()
            else:
                pair.primary.proc.kill()
            info = pair.wait_failover("b", timeout=10)
            start = len(pair.secondary.lines)
            pair.secondary.wait_line(r"dirty: pass=\d+ ok", start=start, timeout=10)
            return (info["failovers"][0]["time"] - t_kill) * 1e3
        finally:
            pair.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring window per row")
    a = ap.parse_args()
    rows = []
    for pages in (100, 1000, 10000):
        r = colo_run(pages, a.seconds)
        rows.append((f"{pages} pages/checkpoint (measured {r['pages']:.0f}): checkpoints/s at 100 ms",
                     f"{r['cps']:.1f} /s", f"transfer {r['mbs']:.0f} MB/s ({r['transfer_ms']:.1f} ms), "
                     f"secondary load {r['load_ms']:.1f} ms"))  # fmt: skip
        rows.append((f"{pages} pages/checkpoint: primary pause", f"p50 {r['pause_p50']:.2f} ms",
                     f"p99 {r['pause_p99']:.2f} ms"))  # fmt: skip
        if pages == 1000:
            plain = plain_rate(pages, a.seconds)
            rows.append(("guest speed, 1000 pages, COLO at 100 ms vs plain run", f"{r['rate'] / plain:.2f}x",
                         f"{r['rate']:.0f} vs {plain:.0f} passes/s"))  # fmt: skip
            shared = plain_rate(pages, a.seconds, neighbour=True)
            rows.append(("  ... vs plain run next to a second busy guest (same CPU sharing)", f"{r['rate'] / shared:.2f}x",
                         f"{r['rate']:.0f} vs {shared:.0f} passes/s"))  # fmt: skip
            late = colo_run(pages, a.seconds, ["--no-resume-early"])
            rows.append(("1000 pages: primary pause when resumed only after LOADED", f"p50 {late['pause_p50']:.2f} ms",
                         f"p99 {late['pause_p99']:.2f} ms; guest {late['rate']:.0f} passes/s"))  # fmt: skip
    rows.append(("failover: SIGKILL primary -> secondary alone (heartbeat 100 ms / 1 s)",
                 f"{failover_time(False):.0f} ms", "the closed connection is seen at once"))  # fmt: skip
    rows.append(("failover: replication link cut -> secondary alone", f"{failover_time(True):.0f} ms",
                 "target: heartbeat timeout + 100 ms = 1100 ms"))  # fmt: skip
    print_table(rows, 14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
