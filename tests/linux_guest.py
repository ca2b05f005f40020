"""kvmcolo's test Linux kernel (scripts/linux-guest builds and caches it) on
a tap inside a network namespace, as a real `kvmcolo run` process."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmcolo.netns import Namespace
from vmm_process import GuestProcess, kvmcolo_exe

ROOT = Path(__file__).resolve().parent.parent
HOST_ADDR, GUEST_ADDR = "192.168.78.1", "192.168.78.2"
BUILD_TIMEOUT = 40 * 60  # the first build on a busy 2-core machine; cached afterwards
BOOT_TIMEOUT = 150  # to IP-Config: 20-60 s here, more on a loaded host


@dataclass
class Kernel:
    vmlinux: Path
    rootfs: Path
    host_cmdline: str  # what this host needs (scripts/linux-guest decides)
    host_cpu: str  # the --cpu model for SMP on this host (likewise)


def build(variant: str) -> Kernel:
    proc = subprocess.run([str(ROOT / "scripts" / "linux-guest"), variant], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"building the {variant} test kernel failed:\n{proc.stderr[-3000:]}")
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Kernel(Path(out["vmlinux"]), Path(out["rootfs"]), out["cmdline"], out["cpu"])


def cmdline(kernel: Kernel, extra: str = "") -> str:
    return (f"console=ttyS0 root=/dev/vda rw init=/init ip={GUEST_ADDR}::{HOST_ADDR}:255.255.255.0::eth0:off "
            f"{kernel.host_cmdline} {extra}").strip()  # fmt: skip


class LinuxGuest:
    """The kernel in a namespace with tap0 (HOST_ADDR/24 on the host side),
    its root image copied so the guest's writes stay in the test's folder."""

    def __init__(self, kernel: Kernel, tmp_path: Path, role: str = "linux", args: list[str] = (),
                 extra_cmdline: str = "", ns: Namespace | None = None):  # fmt: skip
        self.ns = ns or Namespace(role)
        self.disk = tmp_path / f"{role}-root.ext2"
        shutil.copyfile(kernel.rootfs, self.disk)
        try:
            if ns is None:
                self.ns.add_tap("tap0", f"{HOST_ADDR}/24")
            self.vmm = GuestProcess(self.ns.cmd(
                kvmcolo_exe(), "run", "--kernel", str(kernel.vmlinux), "--mem", "256M", "--disk", str(self.disk),
                "--net", "tap=tap0", "--control", str(tmp_path / f"{role}.sock"), *args,
                "--cmdline", cmdline(kernel, extra_cmdline)))  # fmt: skip
        except BaseException:
            self.ns.delete()
            raise

    def ping(self, count: int = 3, deadline: int = 30) -> subprocess.CompletedProcess:
        """ping from the namespace until `count` replies came or `deadline` s passed."""
        return self.ns.run("ping", "-c", str(count), "-w", str(deadline), "-i", "0.5", GUEST_ADDR,
                           timeout=deadline + 10)  # fmt: skip

    def close(self) -> None:
        try:
            self.vmm.stop()
        finally:
            self.ns.delete()
