#!/usr/bin/env python3
"""The live pre-copy (`kvmcolo protect` of a running guest) between two
namespaced hosts on a veth replication link.

    .venv/bin/python benchmarks/bench_precopy.py [--mem 256M,1G] [--max-downtime 100]

Per guest size and load (the `dirty` guest rewriting N pages 10 times a
second, after running alone for a while): time from `protect` to
protected, rounds, MiB sent, the stop (downtime: the guest held for the
final pages and state until the secondary has loaded them and the
comparator has the NICs), why the pre-copy stopped and the highest
throttle it needed.  Then: the same protect on a survivor whose secondary
was killed (re-protection, to the first checkpoint); live migration of
the 256 MiB guest at 1,000 pages / 100 ms (the guest's stop); netsrv
migrated under a client at 100 requests/s (the longest the client waited
between two replies); and the healing cycle under the same client
(SIGKILL the primary, a new secondary on the dead host, automatic
re-protection via --standby): the longest wait per cycle, against the
heartbeat timeout.  Last, switchovers back and forth: the guest's pause
(the new primary's record) for the dirty guest, and for netsrv under the
client the longest wait between two replies.  Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from colo_pair import ColoPair  # noqa: E402
from kvmcolo import control, lab  # noqa: E402
from report import print_table  # noqa: E402
from vmm_process import GuestProcess  # noqa: E402

LOADS = (("idle", ["pages=1", "rate=1", "report=0"]), ("1,000 pages / 100 ms", ["pages=1000", "rate=10", "report=0"]),
         ("10,000 pages / 100 ms", ["pages=10000", "rate=10", "report=0"]))  # fmt: skip


@contextlib.contextmanager
def alone_then_waiting(mem: str, guest_args: list[str], role: str = "secondary"):
    """A dirty guest that has run alone on host A for a while (its pages are
    its own by now), host B's VMM waiting as `role`; yields the ColoPair."""
    vm = ["--image", "dirty", "--mem", mem]
    with tempfile.TemporaryDirectory() as tmp:
        pair = ColoPair(Path(tmp), vm, start=False)
        try:
            pair.start_alone(vm, guest_args)
            time.sleep(2)
            pair.start_secondary(vm, role=role)
            yield pair
        finally:
            pair.close()


def protect_running(mem: str, guest_args: list[str], max_downtime: str) -> dict:
    with alone_then_waiting(mem, guest_args) as pair:
        throttle = 0
        done = pair.protect(["--max-downtime", max_downtime])
        if done.returncode != 0:
            raise SystemExit(f"protect failed: {done.stderr}")
        for line in done.stderr.splitlines():
            if "throttled" in line:
                throttle = max(throttle, int(line.rsplit(" ", 1)[-1].rstrip("%")))
        a = pair.colo("a")
        return {**a["protections"][-1], "stop_reason": a["precopy"]["stop_reason"], "throttle": throttle}


def reprotect(mem: str, guest_args: list[str], max_downtime: str) -> dict:
    vm = ["--image", "dirty", "--mem", mem]
    with tempfile.TemporaryDirectory() as tmp:
        pair = ColoPair(Path(tmp), vm, guest_args)
        try:
            pair.secondary.proc.kill()
            pair.wait_failover("a")
            pair.secondary.proc.wait(10)
            pair.start_secondary(vm)
            t0 = time.monotonic()
            done = pair.protect(["--max-downtime", max_downtime])
            if done.returncode != 0:
                raise SystemExit(f"protect failed: {done.stderr}")
            first = pair.wait_checkpoints(pair.tmp / "a.sock", pair.colo("a")["checkpoints"] + 1)
            elapsed = time.monotonic() - t0
            a = pair.colo("a")
            return {**a["protections"][-1], "to_first_checkpoint_s": elapsed, "checkpoints": first}
        finally:
            pair.close()


def migrate_dirty(mem: str, guest_args: list[str], max_downtime: str) -> dict:
    with alone_then_waiting(mem, guest_args, role="incoming") as pair:
        t0 = time.monotonic()
        done = pair.protect(["--max-downtime", max_downtime], command="migrate")
        if done.returncode != 0:
            raise SystemExit(f"migrate failed: {done.stderr}")
        m = re.search(r": (\d+) pre-copy rounds, ([\d.]+) MiB, downtime ([\d.]+) ms", done.stdout)
        return {"seconds": time.monotonic() - t0, "rounds": int(m[1]), "sent_mib": float(m[2]),
                "downtime_ms": float(m[3])}  # fmt: skip


def _lab_pair(tmp: str):
    the_lab = lab.Lab()
    return the_lab, lab.ColoLab(the_lab, tmp, lambda side, argv: GuestProcess(argv))


def migrate_netsrv_gap(rate: float = 100) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        the_lab, pair = _lab_pair(tmp)
        try:
            pair.start_alone().wait_line(r"netsrv: ready", timeout=60)
            pair.start("B", role="incoming")
            pair.wait_control("B")
            with lab.CounterClient(the_lab.client) as client:
                client.start(rate=rate)
                time.sleep(2)
                t0 = time.monotonic()
                done = pair.protect(command="migrate")
                if done.returncode != 0:
                    raise SystemExit(f"migrate failed: {done.stderr}")
                time.sleep(2)
                _stop_and_check(client)
                return client.longest_gap(since=t0 - 1)[0]
        finally:
            pair.stop()
            the_lab.close()


@contextlib.contextmanager
def _netsrv_pair_under_client(extra: dict | None = None, rate: float = 100):
    """netsrv under COLO on the lab (A primary, B secondary; `extra`: side
    -> boot options), a counter client at `rate` on one connection; yields
    (the ColoLab, the client).  At the end the client must have seen one
    unbroken sequence."""
    extra = extra or {}
    with tempfile.TemporaryDirectory() as tmp:
        the_lab, pair = _lab_pair(tmp)
        try:
            pair.start("B", extra.get("B", []))
            pair.wait_control("B")
            pair.start("A", extra.get("A", [])).wait_line(r"netsrv: ready", timeout=60)
            pair.wait_colo()
            with lab.CounterClient(the_lab.client) as client:
                client.start(rate=rate)
                time.sleep(2)
                yield pair, client
                _stop_and_check(client)
        finally:
            pair.stop()
            the_lab.close()


def heal_gaps(cycles: int = 3) -> list[float]:
    """The longest wait between two replies in each healing cycle."""
    standby = {s: ["--standby", f"{lab.other_addr(s)}:{lab.REPL_PORT}"] for s in "AB"}
    gaps, primary = [], "A"
    with _netsrv_pair_under_client(standby) as (pair, client):
        for cycle in range(1, cycles + 1):
            survivor = "B" if primary == "A" else "A"
            t0 = time.monotonic()
            pair.procs[primary].proc.kill()
            pair.procs[primary].proc.wait(10)
            _wait(lambda: len(control.call(pair.sock(survivor), "query-colo")["failovers"]) == cycle)
            pair.start(primary, standby[primary], role="secondary")
            pair.wait_control(primary)
            _wait(lambda: control.call(pair.sock(survivor), "query-colo")["state"] == "colo")
            time.sleep(1)
            gaps.append(client.longest_gap(since=t0 - 0.5)[0])
            primary = survivor
    return gaps


def _switchover(sock) -> dict:
    """`kvmcolo switchover` at `sock`; the new primary's record of it."""
    before = len(control.call(str(sock), "query-colo")["switchovers"])
    done = subprocess.run([*lab.kvmcolo_command(), "switchover", "--control", str(sock)], capture_output=True,
                          text=True, timeout=90)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"switchover failed: {done.stderr}")
    _wait(lambda: len(control.call(str(sock), "query-colo")["switchovers"]) > before)
    return control.call(str(sock), "query-colo")["switchovers"][-1]


def switchover_dirty(mem: str, guest_args: list[str], rounds: int = 4) -> list[float]:
    """The guest's pause (the new primary's record) for switchovers back and
    forth of a dirty guest under COLO."""
    vm = ["--image", "dirty", "--mem", mem]
    with tempfile.TemporaryDirectory() as tmp:
        pair = ColoPair(Path(tmp), vm, guest_args)
        try:
            pauses, old = [], "a"
            for _ in range(rounds):
                pair.wait_checkpoints(pair.tmp / f"{old}.sock", 5)
                pauses.append(_switchover(pair.tmp / f"{old}.sock")["pause_ms"])
                old = "b" if old == "a" else "a"
            return pauses
        finally:
            pair.close()


def switchover_netsrv_gaps(rounds: int = 4) -> list[tuple[float, float]]:
    """(pause ms, the client's longest wait ms) per switchover of netsrv
    under a client, back and forth."""
    out, old = [], "A"
    with _netsrv_pair_under_client() as (pair, client):
        for _ in range(rounds):
            t0 = time.monotonic()
            record = _switchover(pair.sock(old))
            time.sleep(2)
            out.append((record["pause_ms"], client.longest_gap(since=t0 - 0.5)[0] * 1e3))
            old = "B" if old == "A" else "A"
    return out


def _stop_and_check(client) -> None:
    """The client saw one unbroken sequence on one connection, or the run is void."""
    client.stop()
    if client.error or client.check_sequence():
        raise SystemExit(f"the client saw a problem: {client.error or client.check_sequence()[:3]}")


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.02)


def live_copy_rows(rows: list, args) -> None:
    for mem in args.mem.split(","):
        for name, guest_args in LOADS:
            r = protect_running(mem, guest_args, args.max_downtime)
            rows.append((f"protect {mem}, {name}", f"{r['downtime_ms']:.1f} ms stop",
                         f"{r['seconds']:.2f} s, {r['rounds']} rounds, {r['sent_mib']:.1f} MiB; "
                         f"throttle max {r['throttle']}%; stopped: {r['stop_reason']}"))  # fmt: skip
    r = reprotect("256M", ["pages=1000", "rate=10", "report=0"], args.max_downtime)
    rows.append(("re-protect survivor 256M, 1,000 pages / 100 ms", f"{r['to_first_checkpoint_s']:.2f} s",
                 f"protect -> first checkpoint; {r['rounds']} rounds, {r['sent_mib']:.1f} MiB, "
                 f"stop {r['downtime_ms']:.1f} ms"))  # fmt: skip
    r = migrate_dirty("256M", ["pages=1000", "rate=10", "report=0"], args.max_downtime)
    rows.append(("migrate 256M, 1,000 pages / 100 ms", f"{r['downtime_ms']:.1f} ms stop",
                 f"{r['seconds']:.2f} s, {r['rounds']} rounds, {r['sent_mib']:.1f} MiB (target: stop < 100 ms)"))
    gap = migrate_netsrv_gap()
    rows.append(("migrate netsrv under a client (100 req/s)", f"{gap * 1e3:.0f} ms",
                 "longest wait between two replies across the migration"))  # fmt: skip
    gaps = heal_gaps()
    rows.append(("healing cycle under a client (100 req/s)", f"{max(gaps) * 1e3:.0f} ms",
                 f"longest wait per cycle {', '.join(f'{g * 1e3:.0f}' for g in gaps)} ms; target: heartbeat "
                 "timeout (1000 ms) + 100 ms"))  # fmt: skip


def switchover_rows(rows: list, args) -> None:
    for mem in args.mem.split(","):
        pauses = switchover_dirty(mem, ["pages=1000", "rate=10", "report=0"])
        rows.append((f"switchover {mem}, 1,000 pages / 100 ms", f"{statistics.median(pauses):.1f} ms pause",
                     f"median of {len(pauses)} back and forth ({', '.join(f'{p:.1f}' for p in pauses)} ms)"))
    results = switchover_netsrv_gaps()
    rows.append(("switchover netsrv under a client (100 req/s)",
                 f"{statistics.median([g for _, g in results]):.0f} ms",
                 "longest wait between two replies, median of back and forth ("
                 + ", ".join(f"{g:.0f}" for _, g in results) + " ms; guest paused "
                 + ", ".join(f"{p:.1f}" for p, _ in results) + " ms)"))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="256M,1G", help="guest sizes, comma-separated")
    ap.add_argument("--max-downtime", default="100", help="ms (kvmcolo protect --max-downtime)")
    ap.add_argument("--switchover-only", action="store_true", help="only the switchover rows")
    args = ap.parse_args()
    rows: list = []
    if not args.switchover_only:
        live_copy_rows(rows, args)
    switchover_rows(rows, args)
    print_table(rows)


if __name__ == "__main__":
    main()
