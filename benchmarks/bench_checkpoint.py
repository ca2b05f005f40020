#!/usr/bin/env python3
"""Checkpoint-engine benchmarks (256 MiB guest unless stated).

    .venv/bin/python benchmarks/bench_checkpoint.py [--rounds 40]

  1. Pause time of an in-memory checkpoint — guest stopped, every vCPU/VM/
     device state and the dirty pages captured into a buffer, guest running
     again — at several working-set sizes of the `dirty` guest.
  2. Capture throughput (MB/s of dirty pages gathered) and the cost of
     reading + re-arming the dirty log per GiB of guest RAM, with manual
     protect (GET + CLEAR) and with the legacy GET_DIRTY_LOG.
  3. The C helpers against the same work in Python (bitmap scan, gather).
  4. Full snapshot to a file, and restore to running, for a 256 MiB guest
     whose memory is almost all in use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from report import pct, print_table  # noqa: E402

from kvmcolo import dirty_log, guest_images, vmstate
from kvmcolo.console_buffer import ConsoleBuffer
from kvmcolo.dirty_log import DirtyLog
from kvmcolo.kvm_ffi import ffi
from kvmcolo.machine import Machine, MachineConfig
from kvmcolo.snapshot import Snapshotter, read_chain, restore_machine

MEM = 256 << 20



def dirty_machine(pages: int, mem: int = MEM) -> tuple[Machine, ConsoleBuffer]:
    sink = ConsoleBuffer()
    args = f"pages={max(pages, 1)} report=1000000000"
    m = Machine(MachineConfig(kernel=str(guest_images.image_path("dirty")), cmdline=args, mem_size=mem,
                              serial_output=sink))  # fmt: skip
    m.start()
    sink.wait_for(r"dirty: start")
    return m, sink


def dirty_pass(m: Machine) -> int:
    """The `dirty` guest's completed-pass counter, read from its memory."""
    at = guest_images.symbol_address("dirty", "dirty_state") + 8
    return int.from_bytes(m.vm.memory.read(at, 8), "little")


def wait_passes(m: Machine, n: int, timeout: float = 30.0) -> None:
    target = dirty_pass(m) + n
    deadline = time.monotonic() + timeout
    while dirty_pass(m) < target:
        if time.monotonic() > deadline:
            raise TimeoutError("the dirty guest stopped making passes")
        time.sleep(0.002)


def bench_pause(pages: int, rounds: int) -> dict:
    m, _ = dirty_machine(pages)
    try:
        log = dirty_log.of(m).reader("checkpoint")
        buf = bytearray((pages + 4096) * 4096 + (1 << 20))  # preallocated and touched: no page faults
        m.hold("checkpoint")
        host = vmstate.HostCaps.probe(m.kvm, m.vm.vcpus[0])
        vmstate.capture(m, log, vmstate.KIND_FULL, None, host, buf)
        m.release("checkpoint")
        # Between checkpoints the guest rewrites its whole working set: wait
        # for two completed passes (so at least one whole pass after the last
        # checkpoint), and at least 20 ms.
        pauses, counts = [], []
        for _ in range(rounds):
            time.sleep(0.02)
            if pages:
                wait_passes(m, 2)
            t0 = time.perf_counter()
            m.hold("checkpoint")
            cap = vmstate.capture(m, log, vmstate.KIND_INCREMENTAL, None, host, buf)
            m.release("checkpoint")
            pauses.append((time.perf_counter() - t0) * 1e3)
            counts.append(cap.dirty_pages)
        return {"p50": statistics.median(pauses), "p99": pct(pauses, 0.99), "pages": int(statistics.median(counts))}
    finally:
        m.close()


def bench_dirty_log(manual: bool, mem: int, pages: int, rounds: int = 20) -> float:
    """Microseconds per collect() (read + re-arm + page list) with the guest
    rewriting `pages` pages between collects."""
    m, _ = dirty_machine(pages, mem)
    try:
        log = DirtyLog(m.kvm, m.vm.fd, m.vm.memory, manual=manual).reader("bench")
        m.hold("checkpoint")
        log.collect()
        m.release("checkpoint")
        times = []
        for _ in range(rounds):
            wait_passes(m, 2)
            m.hold("checkpoint")
            t0 = time.perf_counter()
            log.collect()
            times.append((time.perf_counter() - t0) * 1e6)
            m.release("checkpoint")
        return statistics.median(times)
    finally:
        m.close()


def bench_gather(pages: int) -> dict:
    """Bitmap scan + gather of `pages` scattered pages: C helpers vs Python."""
    from kvmcolo.memory import GuestMemory, bitmap_pages

    mem = GuestMemory(MEM)
    try:
        r = mem.regions[0]
        npages = r.npages
        step = max(1, npages // pages)
        chosen = list(range(0, npages, step))[:pages]
        bitmap = bytearray(npages // 8)
        for p in chosen:
            bitmap[p >> 3] |= 1 << (p & 7)
        dst = bytearray(len(chosen) * 4096)
        out = ffi.new("uint32_t[]", npages)
        from kvmcolo.kvm_ffi import lib

        t0 = time.perf_counter()
        n = lib.kvmcolo_bitmap_pages(ffi.from_buffer("uint64_t[]", bitmap), npages // 64, out)
        lib.kvmcolo_gather_pages(ffi.cast("uint8_t *", r.host_addr), out, n, ffi.from_buffer(dst))
        c_time = time.perf_counter() - t0

        t0 = time.perf_counter()
        found = bitmap_pages(bitmap)  # the best pure-Python scan we have
        view = r.view
        for i, p in enumerate(found):
            dst[i * 4096 : (i + 1) * 4096] = view[p * 4096 : (p + 1) * 4096]
        py_time = time.perf_counter() - t0
        assert found == chosen
        return {"c_ms": c_time * 1e3, "py_ms": py_time * 1e3, "c_mbs": len(dst) / c_time / 1e6}
    finally:
        mem.close()


def bench_snapshot_file(pages: int) -> dict:
    m, _ = dirty_machine(pages)
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVMCOLO_BENCH_DIR", "/var/tmp")) as tmp:
        path = os.path.join(tmp, "full.snap")
        try:
            wait_passes(m, 1)
            res = Snapshotter(m).take(path)
        finally:
            m.close()
        t0 = time.perf_counter()
        snaps = read_chain([path])
        sink = ConsoleBuffer()
        r = restore_machine(snaps, serial_output=sink)
        r.start()
        t1 = time.perf_counter()
        try:
            return {"bytes": res.bytes, "pause_ms": res.pause_ms, "write_ms": res.write_ms,
                    "restore_ms": (t1 - t0) * 1e3}  # fmt: skip
        finally:
            r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40, help="checkpoints per working-set size")
    a = ap.parse_args()
    rows = []
    for pages in (0, 100, 1000, 10000, 50000):
        p = bench_pause(pages, a.rounds if pages < 50000 else max(10, a.rounds // 4))
        rows.append((f"checkpoint pause, {pages} dirty pages (measured {p['pages']})",
                     f"p50 {p['p50']:.2f} ms", f"p99 {p['p99']:.2f} ms"))  # fmt: skip
    for pages in (1000, 10000, 50000):
        g = bench_gather(pages)
        rows.append((f"bitmap scan + gather, {pages} pages: C helper", f"{g['c_ms']:.2f} ms",
                     f"{g['c_mbs']:,.0f} MB/s; Python: {g['py_ms']:.2f} ms"))  # fmt: skip
    for manual in (True, False):
        for gib, pages in ((0.25, 1000), (1, 1), (1, 1000), (1, 10000)):
            us = bench_dirty_log(manual, int(gib * (1 << 30)), pages)
            name = "GET + CLEAR (manual protect)" if manual else "GET_DIRTY_LOG (legacy)"
            rows.append((f"dirty log read + re-arm, {name}, {gib:g} GiB guest, {pages} dirty", f"{us:.0f} us",
                         f"{us / gib:.0f} us per GiB"))  # fmt: skip
    s = bench_snapshot_file(60000)
    rows.append(("full snapshot to file, 256 MiB guest (~235 MiB in use)", f"{s['pause_ms'] + s['write_ms']:.0f} ms",
                 f"guest paused {s['pause_ms']:.0f} ms, file write+fsync {s['write_ms']:.0f} ms, "
                 f"{s['bytes'] >> 20} MiB"))  # fmt: skip
    rows.append(("restore to running (new machine, read + check + apply)", f"{s['restore_ms']:.0f} ms", ""))

    print_table(rows, 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
