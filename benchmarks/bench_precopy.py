#!/usr/bin/env python3
"""The live pre-copy (`kvmcolo protect` of a running guest) between two
namespaced hosts on a veth replication link.

    .venv/bin/python benchmarks/bench_precopy.py [--mem 256M,1G] [--max-downtime 100]

Per guest size and load (the `dirty` guest rewriting N pages 10 times a
second, after running alone for a while): time from `protect` to
protected, rounds, MiB sent, the stop (downtime: the guest held for the
final pages and state until the secondary has loaded them and the
comparator has the NICs), why the pre-copy stopped and the highest
throttle it needed.  Then the same protect on a survivor whose secondary
was killed (re-protection).  Needs root.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from colo_pair import ColoPair  # noqa: E402
from report import print_table  # noqa: E402

LOADS = (("idle", ["pages=1", "rate=1", "report=0"]), ("1,000 pages / 100 ms", ["pages=1000", "rate=10", "report=0"]),
         ("10,000 pages / 100 ms", ["pages=10000", "rate=10", "report=0"]))  # fmt: skip


def protect_running(mem: str, guest_args: list[str], max_downtime: str) -> dict:
    vm = ["--image", "dirty", "--mem", mem]
    with tempfile.TemporaryDirectory() as tmp:
        pair = ColoPair(Path(tmp), vm, start=False)
        try:
            pair.start_alone(vm, guest_args)
            time.sleep(2)  # the guest runs unprotected for a while (its pages are its own by now)
            pair.start_secondary(vm)
            throttle = 0
            done = pair.protect(["--max-downtime", max_downtime])
            if done.returncode != 0:
                raise SystemExit(f"protect failed: {done.stderr}")
            for line in done.stderr.splitlines():
                if "throttled" in line:
                    throttle = max(throttle, int(line.rsplit(" ", 1)[-1].rstrip("%")))
            a = pair.colo("a")
            return {**a["protections"][-1], "stop_reason": a["precopy"]["stop_reason"], "throttle": throttle}
        finally:
            pair.close()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="256M,1G", help="guest sizes, comma-separated")
    ap.add_argument("--max-downtime", default="100", help="ms (kvmcolo protect --max-downtime)")
    args = ap.parse_args()
    rows = []
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
    print_table(rows)


if __name__ == "__main__":
    main()
