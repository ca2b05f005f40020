"""A real Linux kernel as the guest (issue 13): Debian's linux-source built
into a minimal PVH vmlinux by scripts/linux-guest (cached per machine),
booted by `kvmcolo run` with a virtio disk and NIC, answering ping from a
namespaced client.  Userspace cannot run on every host (nested PVM), so
/init is a program that never enters the kernel; the kernel itself serves
the network."""

from __future__ import annotations

import pytest

from conftest import require_root
from linux_guest import BOOT_TIMEOUT, LinuxGuest, build


@pytest.fixture(scope="session")
def up_kernel(kvm_device):
    require_root("building and booting the test kernel (apt, taps, namespaces)")
    return build("up")


def test_up_kernel_boots_mounts_its_root_and_answers_ping(up_kernel, tmp_path):
    guest = LinuxGuest(up_kernel, tmp_path)
    try:
        guest.vmm.wait_line(r"Linux version 6\.", timeout=60)
        guest.vmm.wait_line(r"virtio_blk virtio\d+: \[vda\]", timeout=BOOT_TIMEOUT)  # found through virtio-mmio
        guest.vmm.wait_line(r"IP-Config: Complete", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"VFS: Mounted root \(ext2 filesystem\)", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        result = guest.ping(count=3, deadline=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert guest.vmm.proc.poll() is None  # still running, still serving
    finally:
        guest.close()
