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
    vmlinux: Path  # PVH ELF
    bzimage: Path  # the same kernel for the Linux boot protocol
    rootfs: Path  # ext2 with /init
    initrd: Path  # the same tree as a cpio initramfs
    host_cmdline: str  # what this host needs (scripts/linux-guest decides)
    host_cpu: str  # the --cpu model for SMP on this host (likewise)

    def config(self) -> str:
        """The kernel's .config, to check what a test relies on."""
        return (self.vmlinux.parent / ".config").read_text()


def build(variant: str) -> Kernel:
    proc = subprocess.run([str(ROOT / "scripts" / "linux-guest"), variant], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"building the {variant} test kernel failed:\n{proc.stderr[-3000:]}")
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Kernel(Path(out["vmlinux"]), Path(out["bzimage"]), Path(out["rootfs"]), Path(out["initrd"]),
                  out["cmdline"], out["cpu"])  # fmt: skip


def cmdline(kernel: Kernel, extra: str = "", root_disk: bool = True) -> str:
    root = "root=/dev/vda rw init=/init" if root_disk else "rdinit=/init"
    return (f"console=ttyS0 {root} ip={GUEST_ADDR}::{HOST_ADDR}:255.255.255.0::eth0:off "
            f"{kernel.host_cmdline} {extra}").strip()  # fmt: skip


class LinuxGuest:
    """The kernel in a namespace with tap0 (HOST_ADDR/24 on the host side),
    its root image copied so the guest's writes stay in the test's folder.
    image: "vmlinux" (PVH) or "bzimage"; initrd=True boots from the
    initramfs instead of the disk."""

    def __init__(self, kernel: Kernel, tmp_path: Path, role: str = "linux", args: list[str] = (),
                 extra_cmdline: str = "", ns: Namespace | None = None, image: str = "vmlinux",
                 initrd: bool = False):  # fmt: skip
        self.ns = ns or Namespace(role)
        boot = ["--initrd", str(kernel.initrd)] if initrd else []
        if not initrd:
            self.disk = tmp_path / f"{role}-root.ext2"
            shutil.copyfile(kernel.rootfs, self.disk)
            boot = ["--disk", str(self.disk)]
        try:
            if ns is None:
                self.ns.add_tap("tap0", f"{HOST_ADDR}/24")
            self.vmm = GuestProcess(self.ns.cmd(
                kvmcolo_exe(), "run", "--kernel", str(getattr(kernel, image)), "--mem", "256M", *boot,
                "--net", "tap=tap0", "--control", str(tmp_path / f"{role}.sock"), *args,
                "--cmdline", cmdline(kernel, extra_cmdline, root_disk=not initrd)))  # fmt: skip
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


def colo_pair(kernel: Kernel, folder: Path, the_lab, extra: list[str] = (), verify_every: int = 4):
    """The kernel under COLO on the lab (primary on host A, secondary on B),
    each side with its own copy of the root image, the guest at the lab's
    address; returns the ColoLab once the pair is protected."""
    from kvmcolo import lab

    disks = {}
    for side in "AB":
        disks[side] = folder / f"root-{side}.ext2"
        shutil.copyfile(kernel.rootfs, disks[side])
    line = cmdline(kernel).replace(f"ip={GUEST_ADDR}::{HOST_ADDR}:", f"ip={lab.GUEST_ADDR}:::")

    def guest(side):
        return ["--kernel", str(kernel.vmlinux), "--disk", str(disks[side]), "--cmdline", line]

    pair = lab.ColoLab(the_lab, str(folder), lambda side, argv: GuestProcess(argv), mem="256M", guest=guest)
    options = ["--verify-every", str(verify_every), *extra] if verify_every else list(extra)
    pair.start("B", options)
    pair.wait_control("B")
    pair.start("A", options)
    pair.wait_control("A")
    pair.wait_colo(timeout=120)
    return pair
