"""A real Linux kernel as the guest (issue 13): Debian's linux-source built
into a minimal PVH vmlinux by scripts/linux-guest (cached per machine),
booted by `kvmcolo run` with a virtio disk and NIC, answering ping from a
namespaced client.  Userspace cannot run on every host (nested PVM), so
/init is a program that never enters the kernel; the kernel itself serves
the network."""

from __future__ import annotations

import pytest

from conftest import require_root
from linux_guest import BOOT_TIMEOUT, GUEST_ADDR, HOST_ADDR, LinuxGuest, build


@pytest.fixture(scope="session")
def up_kernel(kvm_device):
    require_root("building and booting the test kernel (apt, taps, namespaces)")
    return build("up")


def test_up_kernel_boots_mounts_its_root_and_answers_ping(up_kernel, tmp_path):
    guest = LinuxGuest(up_kernel, tmp_path)
    try:
        guest.vmm.wait_line(r"Linux version 6\.", timeout=60)
        guest.vmm.wait_line(r"Intel MultiProcessor Specification v1\.4", timeout=60)  # kvmcolo's MP table
        guest.vmm.wait_line(r"virtio_blk virtio\d+: \[vda\]", timeout=BOOT_TIMEOUT)  # found through virtio-mmio
        guest.vmm.wait_line(r"IP-Config: Complete", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"VFS: Mounted root \(ext2 filesystem\)", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        result = guest.ping(count=3, deadline=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert guest.vmm.proc.poll() is None  # still running, still serving
        log = "\n".join(guest.vmm.all_lines())
        assert "MP tables are not detected" not in log and "virtual wire mode" not in log, log[-3000:]
    finally:
        guest.close()


@pytest.fixture(scope="session")
def smp_kernel(kvm_device):
    require_root("building and booting the test kernel (apt, taps, namespaces)")
    return build("smp")


def test_smp_kernel_brings_up_both_cpus_and_answers_ping(smp_kernel, tmp_path):
    """Two vCPUs found through the ACPI MADT, with the KVM PV features this
    host cannot serve switched off by the CPU model (on other hosts: none)."""
    guest = LinuxGuest(smp_kernel, tmp_path, args=["--cpus", "2", "--cpu", smp_kernel.host_cpu])
    try:
        guest.vmm.wait_line(r"ACPI: .*MADT|ACPI: APIC", timeout=60)
        guest.vmm.wait_line(r"smp: Brought up 1 node, 2 CPUs", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        result = guest.ping(count=3, deadline=60)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        guest.close()


def test_snapshot_chain_of_a_serving_kernel_restores_and_keeps_answering(up_kernel, tmp_path):
    """A full snapshot once eth0 is up, an incremental one after more
    traffic; the chain restored in a new process answers ping on the same
    address (the tap is recreated by name)."""
    from vmm_process import GuestProcess, kvmcolo_exe

    guest = LinuxGuest(up_kernel, tmp_path)
    restored = None
    try:
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        assert guest.ping(count=2, deadline=60).returncode == 0
        full = guest.vmm.call("snapshot", path=str(tmp_path / "full.snap"))
        assert guest.ping(count=2, deadline=30).returncode == 0
        inc = guest.vmm.call("snapshot", path=str(tmp_path / "inc.snap"), incremental=True)
        assert inc["kind"] == "incremental" and inc["pages"] < full["pages"], (full, inc)
        guest.vmm.call("quit")
        assert guest.vmm.proc.wait(20) == 0
        restored = GuestProcess(guest.ns.cmd(kvmcolo_exe(), "restore", str(tmp_path / "full.snap"),
                                             str(tmp_path / "inc.snap"), "--control", str(tmp_path / "r.sock")))  # fmt: skip
        result = guest.ping(count=3, deadline=60)
        assert result.returncode == 0, result.stdout + "\n".join(restored.stderr_lines[-10:])
        assert restored.proc.poll() is None
    finally:
        if restored is not None:
            restored.stop()
        guest.close()


# ---- Linux under COLO ------------------------------------------------------------------------


def _lab_pair(kernel, tmp_path, the_lab, extra=(), extra_cmdline=""):
    """The kernel under COLO on the lab (primary on host A, secondary on B),
    each side with its own copy of the root image."""
    import shutil

    from kvmcolo import lab
    from linux_guest import cmdline
    from vmm_process import GuestProcess

    disks = {}
    for side in "AB":
        disks[side] = tmp_path / f"root-{side}.ext2"
        shutil.copyfile(kernel.rootfs, disks[side])
    line = cmdline(kernel, extra_cmdline).replace(f"ip={GUEST_ADDR}::{HOST_ADDR}:", f"ip={lab.GUEST_ADDR}:::")

    def guest(side):
        return ["--kernel", str(kernel.vmlinux), "--disk", str(disks[side]), "--cmdline", line]

    pair = lab.ColoLab(the_lab, str(tmp_path), lambda side, argv: GuestProcess(argv), mem="256M", guest=guest)
    pair.start("B", ["--verify-every", "4", *extra])
    pair.wait_control("B")
    pair.start("A", ["--verify-every", "4", *extra])
    pair.wait_control("A")
    pair.wait_colo(timeout=120)
    return pair


def _ping(the_lab, count=3, deadline=60):
    from kvmcolo import lab

    return the_lab.client.run("ping", "-c", str(count), "-w", str(deadline), "-i", "0.5", lab.GUEST_ADDR,
                              timeout=deadline + 10)  # fmt: skip


def _verified_equal(pair) -> int:
    """Every verified checkpoint: the SVM's state hashes equal the PVM's.
    Returns how many were compared."""
    p, s = pair.query("A")["hashes"], pair.query("B")["hashes"]
    common = sorted(set(p) & set(s), key=int)
    for seq in common:
        differing = [k for k in p[seq] if p[seq][k] != s[seq].get(k)]
        assert not differing, f"checkpoint {seq}: the SVM differs from the PVM in {differing}"
    return len(common)


@pytest.mark.parametrize("killed", ["A", "B"], ids=["primary-killed", "secondary-killed"])
def test_linux_under_colo_keeps_answering_when_a_host_dies(up_kernel, tmp_path, killed):
    """The kernel boots under COLO and answers ping through the comparator;
    verified checkpoints have identical SVM and PVM state; one VMM is
    SIGKILLed and the survivor's kernel keeps answering on the same address."""
    import signal

    from conftest import wait_until
    from kvmcolo import lab

    with lab.Lab() as the_lab:
        pair = _lab_pair(up_kernel, tmp_path, the_lab)
        try:
            pair.procs["A"].wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT + 60)
            result = _ping(the_lab)
            assert result.returncode == 0, result.stdout
            wait_until(lambda: _verified_equal(pair) >= 2, "two verified checkpoints", timeout=120)
            colo = pair.query("A")
            print(f"checkpoints {colo['checkpoints']} by reason {colo['reasons']}")  # the note reports these
            survivor = "B" if killed == "A" else "A"
            pair.procs[killed].proc.send_signal(signal.SIGKILL)
            pair.procs[killed].proc.wait(10)
            wait_until(lambda: pair.query(survivor)["failovers"], f"host {survivor} fails over", timeout=30)
            result = _ping(the_lab, count=3, deadline=30)
            assert result.returncode == 0, result.stdout + "\n".join(pair.procs[survivor].stderr_lines[-10:])
            assert pair.procs[survivor].proc.poll() is None
        finally:
            pair.stop()
