#!/usr/bin/env python3
"""Device benchmarks: virtio-blk throughput and virtio-net latency/rate.

    .venv/bin/python benchmarks/bench_devices.py [--mb 256] [--echo 2000] [--udp-seconds 3]

Needs root (taps, a network namespace).  Prints one table:
  - virtio-blk sequential write and read from the guest (`blkbench`, 64 KiB
    requests by default), with in-kernel ioeventfd notifications and with an
    MMIO exit per notification, against `dd` on the host file;
  - TCP echo round trip (p50/p99) and UDP echo packets/s between a client in
    the namespace and the `netsrv` guest.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from guest_net import ECHO_PORT, GUEST_ADDR, UDP_PORT, NetsrvGuest  # noqa: E402

from report import pct, print_table  # noqa: E402

from kvmcolo import guest_images  # noqa: E402
from kvmcolo.console_buffer import ConsoleBuffer  # noqa: E402
from kvmcolo.machine import DiskSpec, Machine, MachineConfig  # noqa: E402



def bench_blk(mb: int, req: int, ioeventfd: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "bench.img"
        with open(img, "wb") as f:
            f.truncate((mb + 1) << 20)
        sink = ConsoleBuffer()
        m = Machine(MachineConfig(kernel=str(guest_images.image_path("blkbench")), cmdline=f"mb={mb} req={req}",
                                  serial_output=sink, disks=[DiskSpec(str(img))], ioeventfd=ioeventfd))  # fmt: skip
        try:
            result = m.run(timeout=600)
            assert result is not None and result.status == 0, (result, sink.text[-500:])
            out = {}
            for kind in ("write", "read"):
                match = sink.wait_for(rf"blkbench: {kind} bytes=(\d+) req=\d+ cycles=(\d+)")
                seconds = int(match.group(2)) / (m.tsc_khz * 1000)
                out[kind] = int(match.group(1)) / seconds / 1e6
            return out
        finally:
            m.close()


def bench_dd(mb: int, req: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "dd.img"
        out = {}
        for kind, argv in (("write", ["dd", "if=/dev/zero", f"of={img}", f"bs={req}", f"count={(mb << 20) // req}",
                                      "conv=fdatasync"]),
                           ("read", ["dd", f"if={img}", "of=/dev/null", f"bs={req}"])):  # fmt: skip
            r = subprocess.run(argv, capture_output=True, text=True, check=True)
            m = re.search(r"copied, ([\d.]+) s", r.stderr)
            out[kind] = (mb << 20) / float(m.group(1)) / 1e6
        return out


def bench_net(echo_rounds: int, udp_seconds: float) -> dict:
    g = NetsrvGuest("bench")
    try:
        with g.ns.entered():
            tcp = socket.create_connection((GUEST_ADDR, ECHO_PORT), timeout=10)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 64
        rtts = []
        for _ in range(echo_rounds):
            t0 = time.perf_counter()
            tcp.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += tcp.recv(64 - len(got))
            rtts.append((time.perf_counter() - t0) * 1e6)
        tcp.close()

        # UDP: keep a window of packets in flight, count echoes.
        udp.settimeout(1)
        window, sent, received = 16, 0, 0
        payload = b"u" * 64
        for _ in range(window):
            udp.sendto(payload, (GUEST_ADDR, UDP_PORT))
            sent += 1
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < udp_seconds:
            try:
                udp.recv(2048)
                received += 1
            except TimeoutError:
                pass
            udp.sendto(payload, (GUEST_ADDR, UDP_PORT))
            sent += 1
        elapsed = time.perf_counter() - t0
        udp.close()
        return {"p50": statistics.median(rtts), "p99": pct(rtts, 0.99), "udp_pps": received / elapsed,
                "udp_lost": sent - received - window}  # fmt: skip
    finally:
        g.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="MiB written and read by the block benchmark")
    ap.add_argument("--req", type=int, default=65536, help="block request size in bytes")
    ap.add_argument("--echo", type=int, default=2000, help="TCP echo round trips")
    ap.add_argument("--udp-seconds", type=float, default=3.0)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_devices: needs root (taps and namespaces)", file=sys.stderr)
        return 2

    rows = []
    dd = bench_dd(a.mb, a.req)
    fast = bench_blk(a.mb, a.req, ioeventfd=True)
    slow = bench_blk(a.mb, a.req, ioeventfd=False)
    for kind in ("write", "read"):
        rows.append((f"virtio-blk sequential {kind}, {a.req >> 10} KiB requests (ioeventfd)", f"{fast[kind]:.0f} MB/s",
                     f"dd on the host file: {dd[kind]:.0f} MB/s"))  # fmt: skip
        rows.append((f"virtio-blk sequential {kind}, {a.req >> 10} KiB requests (MMIO exit)", f"{slow[kind]:.0f} MB/s", ""))
    n = bench_net(a.echo, a.udp_seconds)
    rows.append(("TCP echo round trip, 64 bytes", f"p50 {n['p50']:.0f} us", f"p99 {n['p99']:.0f} us"))
    rows.append(("UDP echo, 64-byte packets, 16 in flight", f"{n['udp_pps']:,.0f} /s", f"{n['udp_lost']} lost"))

    print_table(rows, 14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
