"""The tiny guests boot and do their job through the real VMM on /dev/kvm."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ConsoleSink, kvmcolo_cmd
from kvmcolo.machine import Machine, MachineConfig
from kvmcolo.vcpu import VcpuState


def start(images, name: str, args: str = "", cpus: int = 1, mem: int = 256 << 20) -> tuple[Machine, ConsoleSink]:
    sink = ConsoleSink()
    m = Machine(MachineConfig(kernel=str(images / f"{name}.elf"), cmdline=args, cpus=cpus,
                              mem_size=mem, serial_output=sink))  # fmt: skip
    return m, sink


def test_hello_prints_and_exits_with_status(images):
    proc = kvmcolo_cmd("run", "--image", "hello", "--cpus", "2", "--", "status=5", timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert "hello from kvmcolo guest" in proc.stdout
    m = re.search(r"hello: cpus=(\d+) tsc_khz=(\d+) mem=(\d+) MiB cmdline='status=5'", proc.stdout)
    assert m, proc.stdout
    assert int(m.group(1)) == 2 and int(m.group(2)) > 0 and int(m.group(3)) >= 250
    assert "guest wrote 5 to the debug-exit port" in proc.stderr


def test_hello_default_status_zero_and_serial_log(images, tmp_path):
    log = tmp_path / "console.txt"
    proc = kvmcolo_cmd("run", "--image", "hello", "--serial-log", str(log), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hello from kvmcolo guest" in log.read_text()
    assert "hello from" not in proc.stdout


def test_guest_rejects_unknown_parameter(images):
    proc = kvmcolo_cmd("run", "--image", "hello", "--", "bogus=1", timeout=60)
    assert proc.returncode == 2
    assert "unknown parameter 'bogus'" in proc.stdout


def test_dirty_runs_passes_with_invariants(images):
    m, sink = start(images, "dirty", "pages=512 passes=3000 report=500")
    try:
        result = m.run(timeout=120)
        assert result is not None, "dirty guest did not finish"
        assert result.status == 0, (result, sink.text[-2000:])
        assert "FAIL" not in sink.text
        reports = [int(x) for x in re.findall(r"dirty: pass=(\d+) ok", sink.text)]
        assert reports == list(range(500, 3001, 500))
        assert "dirty: done passes=3000" in sink.text
    finally:
        m.close()


def test_dirty_detects_corrupted_memory(images):
    """The invariant check must catch a page changed behind the guest's back
    (this is what makes it a test vehicle for checkpoint restores)."""
    m, sink = start(images, "dirty", "pages=64 report=1")
    try:
        m.start()
        base = int(sink.wait_for(r"dirty: start .*base=(0x[0-9a-f]+)").group(1), 16)
        sink.wait_for(r"dirty: pass=3 ok")
        m.hold("checkpoint")
        m.vm.memory.write(base + 4096 * 4, bytes(4096))  # zero one page of the working set
        m.release("checkpoint")
        result = m.wait(timeout=30)
        assert result is not None and result.status == 1, (result, sink.text[-1000:])
        assert re.search(r"dirty: FAIL pass=\d+ page=\d+", sink.text)
    finally:
        m.close()


def test_dirty_refuses_working_set_larger_than_ram(images):
    proc = kvmcolo_cmd("run", "--image", "dirty", "--mem", "16M", "--", "pages=100000", timeout=60)
    assert proc.returncode == 2
    assert "does not fit in RAM" in proc.stdout


def test_smp_both_vcpus_progress(images):
    proc = kvmcolo_cmd("run", "--image", "smp", "--cpus", "2", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rounds = re.findall(r"smp: round=(\d+) cpu0=(\d+) cpu1=(\d+)", proc.stdout)
    assert len(rounds) >= 5
    for (_, a0, b0), (_, a1, b1) in zip(rounds, rounds[1:]):
        assert int(a1) > int(a0) and int(b1) > int(b0)
    assert "smp: ok cpus=2" in proc.stdout


def test_smp_needs_two_cpus(images):
    proc = kvmcolo_cmd("run", "--image", "smp", timeout=60)
    assert proc.returncode == 2
    assert "need at least 2 cpus" in proc.stdout


@pytest.mark.parametrize("cpus", [1, 2])
def test_pause_resume_1000_cycles(images, cpus):
    """1,000 pause/resume cycles of running guests: no hang, every vCPU really
    stopped while paused, progress continues afterwards, invariants intact."""
    if cpus == 1:
        m, sink = start(images, "dirty", "pages=128 report=20")
        progress = r"dirty: pass=(\d+) ok"
    else:
        m, sink = start(images, "smp", "rounds=1000000000 interval=5", cpus=2)
        progress = r"smp: round=(\d+) "
    try:
        m.start()
        sink.wait_for(progress)
        for i in range(1000):
            m.hold("checkpoint")
            assert all(v.state is VcpuState.PAUSED for v in m.vm.vcpus)
            if i % 100 == 0:
                # Really stopped: no console output and no exits while paused.
                before_text, before_exits = len(sink.text), [v.exits for v in m.vm.vcpus]
                regs = [v.get_regs().rip for v in m.vm.vcpus]  # state is readable while paused
                assert all(rip for rip in regs)
                assert len(sink.text) == before_text and [v.exits for v in m.vm.vcpus] == before_exits
            m.release("checkpoint")
        assert m.vm.exit is None, m.vm.exit
        last = int(re.findall(progress, sink.text)[-1])
        sink.wait_for(progress.replace(r"(\d+)", str(last + 2 if cpus == 2 else last + 40)), timeout=60)
        assert "FAIL" not in sink.text
    finally:
        m.close()


def test_i8042_reset_ends_the_vmm_cleanly(images):
    proc = kvmcolo_cmd("run", "--image", "hello", "--", "status=7", "reset=1", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hello: resetting through the i8042" in proc.stdout
    assert "guest requested a reset through the i8042" in proc.stderr


PVH_NOTE = """
    .section .note.Xen, "a"
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .long _start
"""


def build_asm_guest(tmp_path, name: str, code: str) -> str:
    """A 32-bit PVH guest of a few instructions, assembled with gcc/ld."""
    src, obj, elf = tmp_path / f"{name}.S", tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    src.write_text("    .code32\n    .text\n    .globl _start\n_start:\n" + code + PVH_NOTE)
    subprocess.run(["gcc", "-m32", "-c", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext=0x100000", "-o", str(elf), str(obj)],
                   check=True, capture_output=True)  # fmt: skip
    return str(elf)


def test_triple_fault_is_reported_and_ends_the_vmm(kvm_device, tmp_path):
    elf = build_asm_guest(tmp_path, "triple", """
    lidt empty_idt        /* no IDT at all: the next exception cannot be delivered */
    ud2                   /* #UD -> #DF -> triple fault -> KVM_EXIT_SHUTDOWN */
empty_idt:
    .word 0
    .long 0
""")
    proc = kvmcolo_cmd("run", "--kernel", elf, timeout=60)
    assert proc.returncode == 1, proc.stderr  # a crash, not a clean exit
    assert "the guest triple-faulted (KVM_EXIT_SHUTDOWN)" in proc.stderr
    assert re.search(r"rip=0000000000100", proc.stderr), proc.stderr  # the register dump


def test_unexpected_exit_stops_the_vm_with_reason_and_registers(kvm_device, tmp_path):
    # Executing from an address with no memory behind it (the MMIO hole)
    # cannot be emulated: KVM exits with an internal error.
    elf = build_asm_guest(tmp_path, "mmiojump", """
    mov $0xd0000000, %eax
    jmp *%eax
""")
    proc = kvmcolo_cmd("run", "--kernel", elf, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "vcpu 0: KVM_EXIT_INTERNAL_ERROR" in proc.stderr
    assert "rip=00000000d0000000" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_vcpu_started_paused_runs_no_instruction(images):
    m, sink = start(images, "dirty", "pages=16 report=1")
    try:
        before = m.vm.vcpus[0].get_regs().rip
        m.vm.vcpus[0].request_pause()
        assert m.vm.vcpus[0].run.immediate_exit == 1  # its first KVM_RUN cannot enter the guest
        m.start_paused()
        assert m.vm.vcpus[0].get_regs().rip == before and sink.text == ""
        assert m.run_state.set_operator(False)
        sink.wait_for(r"dirty: pass=1 ok")
    finally:
        m.close()
