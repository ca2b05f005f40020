#!/usr/bin/env python3
"""Foundation benchmarks: exit round trip, pause/resume latency, CPL3 speed.

    .venv/bin/python benchmarks/bench_foundation.py [--cycles 1000] [--pio 200000]

Prints one table.  Figures are for the machine it runs on; the README
records the ones measured on the project's reference machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from report import pct, print_table  # noqa: E402

from kvmcolo import guest_images
from kvmcolo.console_buffer import ConsoleBuffer
from kvmcolo.machine import Machine, MachineConfig


def machine(image: str, args: str, cpus: int = 1) -> tuple[Machine, ConsoleBuffer]:
    sink = ConsoleBuffer()
    m = Machine(MachineConfig(kernel=str(guest_images.image_path(image)), cmdline=args, cpus=cpus, serial_output=sink))
    return m, sink


def bench_exits(count: int) -> dict:
    m, sink = machine("pio", f"count={count}")
    try:
        t0 = time.perf_counter()
        result = m.run(timeout=300)
        wall = time.perf_counter() - t0
        line = sink.wait_for(r"pio: count=(\d+) cycles=(\d+)")
        guest_s = int(line.group(2)) / (m.tsc_khz * 1000)
        assert result is not None and result.status == 0, result
        assert m.post_code.writes == count, (m.post_code.writes, count)
        return {"exits_per_s": count / guest_s, "us_per_exit": guest_s / count * 1e6, "wall_s": wall}
    finally:
        m.close()


def bench_pause(cycles: int, cpus: int) -> dict:
    # 1 vCPU: the dirty workload; 2 vCPUs: the smp workload keeps both busy at CPL3.
    if cpus == 1:
        m, sink = machine("dirty", "pages=64 report=1000000", cpus)
        ready = r"dirty: start"
    else:
        m, sink = machine("smp", "rounds=1000000000 interval=1000", cpus)
        ready = r"smp: round=1 "
    try:
        m.start()
        sink.wait_for(ready)
        pauses, resumes = [], []
        for _ in range(cycles):
            t0 = time.perf_counter()
            m.hold("checkpoint")
            t1 = time.perf_counter()
            m.release("checkpoint")
            t2 = time.perf_counter()
            pauses.append((t1 - t0) * 1e6)
            resumes.append((t2 - t1) * 1e6)
            time.sleep(0.0005)  # let the guest run between cycles
        assert m.vm.exit is None, m.vm.exit
        both = [p + r for p, r in zip(pauses, resumes)]
        return {
            "pause_p50": statistics.median(pauses), "pause_p99": pct(pauses, 0.99),
            "resume_p50": statistics.median(resumes), "resume_p99": pct(resumes, 0.99),
            "both_p99": pct(both, 0.99), "both_max": max(both),
        }  # fmt: skip
    finally:
        m.close()


def bench_cpl3(iters: int) -> dict:
    m, sink = machine("spin", f"iters={iters}")
    try:
        m.run(timeout=300)
        guest = int(sink.wait_for(r"spin: iters=\d+ cycles=(\d+)").group(1))
    finally:
        m.close()
    host_bin = guest_images.build_dir() / "spin-host"
    out = subprocess.run([str(host_bin), str(iters)], capture_output=True, text=True, check=True).stdout
    native = int(re.search(r"cycles=(\d+)", out).group(1))
    return {"guest_cycles": guest, "native_cycles": native, "ratio": guest / native}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000, help="pause/resume cycles per row")
    ap.add_argument("--pio", type=int, default=200000, help="port writes for the exit benchmark")
    ap.add_argument("--iters", type=int, default=300_000_000, help="spin iterations for the CPL3 benchmark")
    a = ap.parse_args()

    rows = []
    e = bench_exits(a.pio)
    rows.append(("port-I/O exits through the Python run loop", f"{e['exits_per_s']:,.0f} /s", f"{e['us_per_exit']:.1f} us per exit"))
    for cpus in (1, 2):
        p = bench_pause(a.cycles, cpus)
        rows.append((f"pause, {cpus} vCPU{'s' if cpus > 1 else ''} (all stopped)", f"p50 {p['pause_p50']:.0f} us", f"p99 {p['pause_p99']:.0f} us"))
        rows.append((f"resume, {cpus} vCPU{'s' if cpus > 1 else ''}", f"p50 {p['resume_p50']:.0f} us", f"p99 {p['resume_p99']:.0f} us"))
        rows.append((f"pause+resume, {cpus} vCPU{'s' if cpus > 1 else ''}", f"p99 {p['both_p99']:.0f} us", f"max {p['both_max']:.0f} us"))
    c = bench_cpl3(a.iters)
    rows.append(("CPL3 loop, guest / native time", f"{c['ratio']:.3f}", f"{c['guest_cycles']:,} vs {c['native_cycles']:,} cycles"))

    print_table(rows, 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
