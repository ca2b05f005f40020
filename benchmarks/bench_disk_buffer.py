#!/usr/bin/env python3
"""FUSE disk overlay benchmark: throughput through the overlay vs the raw file.

    .venv/bin/python benchmarks/bench_disk_buffer.py [--mb 128] [--dir /var/tmp]

Needs root and /dev/fuse.  Prints one table:
  - 64 KiB sequential and 4 KiB random write and read, os.pwrite/os.pread
    from Python on the base file itself ("raw") and on the overlay's file;
    overlay writes land in new overlay blocks (then rewrite them), overlay
    reads come from the base (empty overlay) and from overlay blocks;
  - drop() with an empty overlay (median of many calls) and with N blocks,
    and commit() of N blocks.
Both sides run on the page cache (the files are fresh and small enough), so
the figures compare the overlay's own cost, not the disk's; RAM is touched
once before (see warm_page_cache).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import pct, print_table  # noqa: E402

from kvmcolo.disk_buffer import OverlayMount  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


def offsets(kind: str, size: int, req: int, total: int) -> list[int]:
    n = total // req
    if kind == "seq":
        return [(i * req) % size for i in range(n)]
    rng = random.Random(1)
    return [rng.randrange(size // req) * req for _ in range(n)]


def run(fd: int, op: str, offs: list[int], req: int) -> float:
    """MB/s of `op` (read/write) at `offs`."""
    buf = os.urandom(req)
    t0 = time.perf_counter()
    if op == "write":
        for off in offs:
            os.pwrite(fd, buf, off)
    else:
        for off in offs:
            os.pread(fd, req, off)
    return len(offs) * req / (time.perf_counter() - t0) / 1e6


def fill(fd: int, nblocks: int, block: int = 4096) -> None:
    """Put `nblocks` scattered blocks into the overlay (every other block, so
    the commit cannot merge them into one run)."""
    buf = os.urandom(block)
    for i in range(nblocks):
        os.pwrite(fd, buf, 2 * i * block)


def warm_page_cache(directory: str, mb: int) -> None:
    """Write and delete `mb` MiB: on a fresh VM, the first time the guest
    touches a page of its RAM costs a fault in the host, and whichever side
    ran first (here the overlay's growing scratch file) would pay for it."""
    with tempfile.TemporaryFile(dir=directory) as f:
        chunk = bytes(MiB)
        for _ in range(mb):
            f.write(chunk)
        f.flush()


def bench_apply(directory: str) -> list[tuple[str, str, str]]:
    """The checkpoint's disk step on the secondary: pending primary writes
    through the journal into the base (fsyncs included)."""
    from kvmcolo.disk_replication import PendingWrites, apply_writes

    rows = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        base = os.path.join(tmp, "base.img")
        with open(base, "wb") as f:
            f.truncate(128 * MiB)
        for mib in (0, 1, 16, 64):
            pending = PendingWrites(tmp)
            chunk = os.urandom(64 * KiB)
            for i in range(mib * MiB // len(chunk)):
                pending.add(i * len(chunk), chunk)
            times = []
            for _ in range(3 if mib else 200):
                t0 = time.perf_counter()
                apply_writes(base, pending)
                times.append((time.perf_counter() - t0) * 1e3)
            pending.clear()
            rows.append((f"checkpoint disk apply, {mib} MiB pending (64 KiB writes)",
                         f"{statistics.median(times):.2f} ms", "journal + fsync, base + fsync" if mib else
                         "no pending writes: nothing is written"))  # fmt: skip
    return rows


def bench_guest(directory: str, mb: int) -> list[tuple[str, str, str]]:
    """What a guest sees: `blkbench` (64 KiB requests through virtio-blk) on
    the raw image and on the same image through the overlay."""
    from kvmcolo import guest_images
    from kvmcolo.console_buffer import ConsoleBuffer
    from kvmcolo.machine import DiskSpec, Machine, MachineConfig

    def blkbench(path: str) -> dict:
        sink = ConsoleBuffer()
        m = Machine(MachineConfig(kernel=str(guest_images.image_path("blkbench")), cmdline=f"mb={mb}",
                                  serial_output=sink, disks=[DiskSpec(path)]))  # fmt: skip
        try:
            m.run(timeout=600)
            out = {}
            for kind in ("write", "read"):
                match = sink.wait_for(rf"blkbench: {kind} bytes=(\d+) req=\d+ cycles=(\d+)")
                out[kind] = int(match.group(1)) / (int(match.group(2)) / (m.tsc_khz * 1000)) / 1e6
            return out
        finally:
            m.close()

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        base = os.path.join(tmp, "guest.img")
        with open(base, "wb") as f:
            f.truncate((mb + 1) * MiB)
        raw = blkbench(base)
        mount = OverlayMount(base, os.path.join(tmp, "mnt"))
        try:
            over = blkbench(mount.image_path)
        finally:
            mount.close()
    return [(f"guest 64 KiB sequential {k} (blkbench): overlay vs raw image", f"{over[k]:.0f} MB/s",
             f"raw {raw[k]:.0f} MB/s: {over[k] / raw[k]:.0%}") for k in ("write", "read")]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=128, help="size of the disk and MiB moved per figure")
    ap.add_argument("--dir", default="/var/tmp", help="where the base image (and the overlay's scratch file) live")
    ap.add_argument("--drops", type=int, default=500, help="empty drop() calls to time")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_disk_buffer: needs root (FUSE mounts)", file=sys.stderr)
        return 2

    size = a.mb * MiB
    rows = []
    warm_page_cache(a.dir, 3 * a.mb)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        base = os.path.join(tmp, "disk.img")
        with open(base, "wb") as f:
            for _ in range(a.mb):
                f.write(os.urandom(MiB))
        raw = os.open(base, os.O_RDWR)
        with OverlayMount(base) as mount:
            ov = os.open(mount.image_path, os.O_RDWR)
            for kind, req in (("seq", 64 * KiB), ("rand", 4 * KiB)):
                total = size if kind == "seq" else min(size, 32 * MiB)
                offs = offsets(kind, size, req, total)
                label = f"{req >> 10} KiB {'sequential' if kind == 'seq' else 'random'}"
                mount.drop()
                raw_w = run(raw, "write", offs, req)
                raw_r = run(raw, "read", offs, req)
                ov_r_base = run(ov, "read", offs, req)
                ov_w_new = run(ov, "write", offs, req)
                ov_w_again = run(ov, "write", offs, req)
                ov_r_ov = run(ov, "read", offs, req)
                blocks = mount.stats()["overlay_blocks"]
                rows.append((f"{label} write, raw file", f"{raw_w:.0f} MB/s", f"{total >> 20} MiB"))
                rows.append((f"{label} write, overlay (new blocks)", f"{ov_w_new:.0f} MB/s",
                             f"{ov_w_new / raw_w:.0%} of raw; {blocks} overlay blocks after"))  # fmt: skip
                rows.append((f"{label} write, overlay (rewrite)", f"{ov_w_again:.0f} MB/s", f"{ov_w_again / raw_w:.0%} of raw"))
                rows.append((f"{label} read, raw file", f"{raw_r:.0f} MB/s", ""))
                rows.append((f"{label} read, overlay (from base)", f"{ov_r_base:.0f} MB/s", f"{ov_r_base / raw_r:.0%} of raw"))
                rows.append((f"{label} read, overlay (from overlay)", f"{ov_r_ov:.0f} MB/s", f"{ov_r_ov / raw_r:.0%} of raw"))

            mount.drop()
            times = []
            for _ in range(a.drops):
                t0 = time.perf_counter()
                mount.drop()
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append(("drop(), empty overlay", f"{statistics.median(times):.3f} ms",
                         f"p99 {pct(times, 0.99):.3f} ms over {a.drops} calls"))  # fmt: skip
            for n in (1024, 16384):
                if 2 * n * 4096 > size:
                    continue
                fill(ov, n)
                t0 = time.perf_counter()
                mount.drop()
                rows.append((f"drop(), {n} overlay blocks", f"{(time.perf_counter() - t0) * 1e3:.3f} ms",
                             f"{n * 4096 >> 20} MiB in the overlay"))  # fmt: skip
            n = min(16384, size // 8192)
            fill(ov, n)
            t0 = time.perf_counter()
            mount.commit()
            rows.append((f"commit(), {n} scattered blocks", f"{(time.perf_counter() - t0) * 1e3:.1f} ms",
                         "copy into the base + fsync; passthrough after"))  # fmt: skip
            offs = offsets("seq", size, 64 * KiB, size)
            pt_w = run(ov, "write", offs, 64 * KiB)
            rows.append(("64 KiB sequential write, passthrough", f"{pt_w:.0f} MB/s", "after commit(): straight to the base"))
            os.close(ov)
        os.close(raw)
        rows.extend(bench_apply(a.dir))
        rows.extend(bench_guest(a.dir, min(a.mb, 128)))
    print_table(rows, 14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
