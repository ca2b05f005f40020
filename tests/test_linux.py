"""A real Linux kernel as the guest (issue 13): Debian's linux-source built
into a minimal PVH vmlinux by scripts/linux-guest (cached per machine),
booted by `kvmcolo run` with a virtio disk and NIC, answering ping from a
namespaced client.  Userspace cannot run on every host (nested PVM), so
/init is a program that never enters the kernel; the kernel itself serves
the network."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import require_root
from linux_guest import BOOT_TIMEOUT, LinuxGuest, build, colo_pair


@pytest.fixture(scope="session")
def up_kernel(kvm_device):
    require_root("building and booting the test kernel (apt, taps, namespaces)")
    return build("up")


def test_up_kernel_boots_mounts_its_root_and_answers_ping(up_kernel, tmp_path):
    guest = LinuxGuest(up_kernel, tmp_path)
    try:
        guest.vmm.wait_line(r"Linux version 6\.", timeout=60)
        guest.vmm.wait_line(r"Intel MultiProcessor Specification v1\.4", timeout=60)  # kvmcolo's MP table
        # the CMOS RTC, read by the kernel's own driver: the host's time
        clock = guest.vmm.wait_line(r"rtc_cmos rtc_cmos: setting system clock to \S+ UTC \((\d+)\)", timeout=BOOT_TIMEOUT)
        assert abs(int(clock.group(1)) - time.time()) < 120, clock.group(0)
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


def test_serial_console_takes_a_sysrq_through_its_receive_interrupt(up_kernel, tmp_path):
    """`kvmcolo sysrq h`: a BREAK and 'h' on the UART, taken by the 8250
    driver's interrupt handler (IRQ 4 through the IOAPIC) once the console
    is open, and handled in the kernel: no userspace involved."""
    from vmm_process import kvmcolo_exe

    guest = LinuxGuest(up_kernel, tmp_path)
    try:
        guest.vmm.wait_line(r"ttyS0 at I/O 0x3f8 \(irq = 4,", timeout=BOOT_TIMEOUT)
        at = len(guest.vmm.lines)
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)  # /dev/console is open by now
        cli = subprocess.run([kvmcolo_exe(), "sysrq", "--control", guest.vmm.control_path, "h"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        guest.vmm.wait_line(r"sysrq: HELP : ", timeout=60, start=at)
        bad = subprocess.run([kvmcolo_exe(), "sysrq", "--control", guest.vmm.control_path, "hh"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "one printable character" in bad.stderr
    finally:
        guest.close()


@pytest.mark.parametrize("image, found", [("bzimage", r"bzImage, boot protocol 2\.1\d, 64-bit entry"),
                                          ("vmlinux", r"PVH ELF, entry")])  # fmt: skip
def test_kernel_boots_from_its_initrd_in_either_format(up_kernel, tmp_path, image, found):
    """The same kernel as a bzImage (64-bit Linux boot protocol: zero page,
    e820, initrd fields) and as a PVH ELF (start_info module), each with the
    cpio initramfs as its root and no disk; --kernel tells them apart."""
    import re

    guest = LinuxGuest(up_kernel, tmp_path, image=image, initrd=True)
    try:
        guest.vmm.wait_line(r"Unpacking initramfs", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"Freeing initrd memory: \d+K", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        assert any(re.search(found, line) for line in guest.vmm.stderr_lines), guest.vmm.stderr_lines[:5]
        result = guest.ping(count=2, deadline=60)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        guest.close()


@pytest.fixture(scope="session")
def smp_kernel(kvm_device):
    require_root("building and booting the test kernel (apt, taps, namespaces)")
    return build("smp")


def test_smp_kernel_finds_its_cpus_and_devices_through_acpi_and_answers_ping(smp_kernel, tmp_path):
    """Two vCPUs found through the ACPI MADT, with the KVM PV features this
    host cannot serve switched off by the CPU model (on other hosts: none);
    a hardware-reduced FADT; and vda and eth0 found through the DSDT only,
    as a distribution kernel finds them: this kernel has no
    VIRTIO_MMIO_CMDLINE_DEVICES, so the command line's virtio_mmio.device=
    words mean nothing to it."""
    assert "# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set" in smp_kernel.config()
    guest = LinuxGuest(smp_kernel, tmp_path, args=["--cpus", "2", "--cpu", smp_kernel.host_cpu])
    try:
        guest.vmm.wait_line(r"ACPI: .*MADT|ACPI: APIC", timeout=60)
        guest.vmm.wait_line(r"ACPI: DSDT 0x", timeout=60)
        guest.vmm.wait_line(r"smp: Brought up 1 node, 2 CPUs", timeout=BOOT_TIMEOUT)
        guest.vmm.wait_line(r"virtio_blk virtio\d+: \[vda\]", timeout=BOOT_TIMEOUT)
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
        pair = colo_pair(up_kernel, tmp_path, the_lab)
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
