#!/usr/bin/env python3
"""A real Linux kernel under kvmcolo (issue 13): the UP test kernel of
scripts/linux-guest with a virtio disk and NIC.

    .venv/bin/python benchmarks/bench_linux.py [--runs 3] [--idle 30]

- boot time to `IP-Config: Complete` under `kvmcolo run` and under
  `qemu-system-x86_64 -M microvm,acpi=off,rtc=on -accel kvm` (installed if
  missing) with the
  same kernel, root image and parameters, runs interleaved, as a ratio;
- snapshot of the idle kernel: size and guest pause, full then incremental;
- under COLO on the lab, idle: dirty pages and primary pause per
  checkpoint, checkpoints by reason; ping round trip with and without COLO.
Needs root.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from linux_guest import BOOT_TIMEOUT, HOST_ADDR, LinuxGuest, build, cmdline, colo_pair  # noqa: E402
from report import print_table  # noqa: E402
from vmm_process import GuestProcess  # noqa: E402

from kvmcolo.netns import Namespace  # noqa: E402

IP_CONFIG = r"IP-Config: Complete"


def qemu() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        print("installing qemu-system-x86 (for the comparison)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), stdout=subprocess.DEVNULL)  # fmt: skip
        exe = shutil.which("qemu-system-x86_64")
    return exe


def boot_kvmcolo(kernel, folder: Path) -> float:
    t0 = time.monotonic()
    guest = LinuxGuest(kernel, folder, role="bench")
    try:
        guest.vmm.wait_line(IP_CONFIG, timeout=BOOT_TIMEOUT)
        return time.monotonic() - t0
    finally:
        guest.close()


def boot_qemu(kernel, folder: Path, exe: str) -> float:
    disk = folder / "qemu-root.ext2"
    shutil.copyfile(kernel.rootfs, disk)
    ns = Namespace("qemu")
    try:
        ns.add_tap("tap0", f"{HOST_ADDR}/24")
        t0 = time.monotonic()
        vm = GuestProcess(ns.cmd(
            # acpi=off: the test kernel has no ACPI, and only without it does microvm announce its
            # virtio devices on the command line (and write an MP table), as kvmcolo does; rtc=on
            # as kvmcolo has one.  -arch-capabilities: QEMU's host model writes
            # MSR_IA32_ARCH_CAPABILITIES, which nested PVM refuses (QEMU aborts); harmless elsewhere.
            exe, "-M", "microvm,acpi=off,rtc=on", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-kernel", str(kernel.vmlinux), "-append", cmdline(kernel),
            "-drive", f"id=root,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=root",
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no", "-device", "virtio-net-device,netdev=net0"))  # fmt: skip
        try:
            vm.wait_line(IP_CONFIG, timeout=BOOT_TIMEOUT)
            return time.monotonic() - t0
        finally:
            vm.stop()
    finally:
        ns.delete()


def rtt_ms(ping: subprocess.CompletedProcess) -> float:
    m = re.search(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/", ping.stdout)
    if ping.returncode != 0 or not m:
        raise RuntimeError(f"ping failed: {ping.stdout}{ping.stderr}")
    return float(m.group(1))


PINGS = ["-c", "20", "-i", "0.2", "-w", "30"]


def snapshot_and_plain_rtt(kernel, folder: Path, idle: float) -> tuple[dict, dict, float]:
    guest = LinuxGuest(kernel, folder, role="snap")
    try:
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        rtt = rtt_ms(guest.ns.run("ping", *PINGS, "192.168.78.2", timeout=40))
        full = guest.vmm.call("snapshot", path=str(folder / "full.snap"))
        time.sleep(idle)  # the idle kernel's own activity between the two
        inc = guest.vmm.call("snapshot", path=str(folder / "inc.snap"), incremental=True)
        return full, inc, rtt
    finally:
        guest.close()


def colo_idle(kernel, folder: Path, idle: float) -> tuple[dict, float]:
    from kvmcolo import lab

    with lab.Lab() as the_lab:
        pair = colo_pair(kernel, folder, the_lab, verify_every=0)
        try:
            pair.procs["A"].wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT + 60)
            rtt = rtt_ms(the_lab.client.run("ping", *PINGS, lab.GUEST_ADDR, timeout=40))
            time.sleep(idle)  # idle: only the kernel's own timers run
            return pair.query("A"), rtt
        finally:
            pair.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="boots of each VMM (interleaved)")
    ap.add_argument("--idle", type=float, default=30, help="seconds of idle guest under COLO")
    args = ap.parse_args()
    kernel = build("up")
    exe = qemu()
    folder = Path(tempfile.mkdtemp(prefix="kvmcolo-bench-linux-"))
    ours, theirs = [], []
    for i in range(args.runs):
        ours.append(boot_kvmcolo(kernel, folder))
        theirs.append(boot_qemu(kernel, folder, exe))
        print(f"boot {i + 1}: kvmcolo {ours[-1]:.1f} s, qemu microvm {theirs[-1]:.1f} s", file=sys.stderr)
    full, inc, plain_rtt = snapshot_and_plain_rtt(kernel, folder, min(args.idle, 10))
    colo, colo_rtt = colo_idle(kernel, folder, args.idle)
    recent = colo["recent"]
    dirty = [r["dirty_pages"] for r in recent]
    pause = [r["pause_ms"] for r in recent]
    mo, mq = statistics.median(ours), statistics.median(theirs)
    rows = [
        ("boot to IP-Config, kvmcolo run", f"{mo:.1f} s", f"median of {args.runs}: {', '.join(f'{t:.1f}' for t in ours)}"),
        ("boot to IP-Config, qemu microvm", f"{mq:.1f} s", f"median of {args.runs}: {', '.join(f'{t:.1f}' for t in theirs)}"),
        ("boot time kvmcolo / qemu", f"{mo / mq:.2f}", "same kernel, root, parameters; interleaved"),
        ("snapshot full, idle kernel", f"{full['bytes'] / 2**20:.1f} MiB", f"{full['pages']} pages, pause {full['pause_ms']:.1f} ms"),
        ("snapshot incremental", f"{inc['bytes'] / 2**20:.2f} MiB", f"{inc['pages']} pages after {min(args.idle, 10):.0f} s idle, "
                                                                   f"pause {inc['pause_ms']:.1f} ms"),
        ("COLO dirty pages/checkpoint", f"{statistics.median(dirty):.0f}", f"median of the last {len(dirty)} (max {max(dirty)})"),
        ("COLO primary pause", f"{statistics.median(pause):.1f} ms", f"median (max {max(pause):.1f} ms)"),
        ("COLO checkpoints by reason", f"{colo['checkpoints']}", ", ".join(f"{k} {v}" for k, v in colo["reasons"].items())),
        ("ping round trip, no COLO", f"{plain_rtt:.2f} ms", "20 pings, avg"),
        ("ping round trip, COLO", f"{colo_rtt:.2f} ms", f"20 pings, avg; x{colo_rtt / plain_rtt:.1f}"),
    ]  # fmt: skip
    print_table(rows)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
