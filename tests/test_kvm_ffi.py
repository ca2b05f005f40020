"""The bindings: layouts agree with the kernel headers, errors name the ioctl."""

from __future__ import annotations

import subprocess

import pytest

from kvmcolo.errors import UserError
from kvmcolo.kvm_ffi import EXIT_REASON_NAMES, Kvm, KvmError, ffi, ioctl, lib

# (C type as cffi knows it, C expression type, fields the VMM reads or writes)
LAYOUTS = [
    ("struct kvm_regs", "struct kvm_regs", ["rax", "rbx", "rsp", "rip", "rflags", "r15"]),
    ("struct kvm_sregs", "struct kvm_sregs", ["cs", "ss", "tr", "gdt", "idt", "cr0", "cr3", "cr4", "efer", "apic_base"]),
    ("struct kvm_segment", "struct kvm_segment", ["base", "limit", "selector", "type", "present", "dpl", "db", "l", "g"]),
    ("struct kvm_run", "struct kvm_run", ["immediate_exit", "exit_reason", "if_flag", "cr8", "apic_base"]),
    ("struct kvm_userspace_memory_region", "struct kvm_userspace_memory_region",
     ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"]),
    ("struct kvm_cpuid_entry2", "struct kvm_cpuid_entry2", ["function", "index", "flags", "eax", "ebx", "ecx", "edx"]),
    ("struct kvm_irq_level", "struct kvm_irq_level", ["irq", "level"]),
    ("kvm_exit_io_t", "__typeof__(((struct kvm_run *)0)->io)", ["direction", "size", "port", "count", "data_offset"]),
    ("kvm_exit_mmio_t", "__typeof__(((struct kvm_run *)0)->mmio)", ["phys_addr", "data", "len", "is_write"]),
    ("struct kvm_vcpu_events", "struct kvm_vcpu_events", []),
    ("struct kvm_xsave", "struct kvm_xsave", []),
    ("struct kvm_lapic_state", "struct kvm_lapic_state", []),
    ("struct kvm_pit_state2", "struct kvm_pit_state2", []),
]  # fmt: skip


def test_layouts_match_an_independent_compile(tmp_path):
    """Compile a separate C program against <linux/kvm.h> and compare every
    size and offset with what the cffi module uses."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    expected = []
    for cffi_type, c_type, fields in LAYOUTS:
        lines.append(f'printf("%zu\\n", sizeof({c_type}));')
        expected.append(ffi.sizeof(cffi_type))
        for f in fields:
            lines.append(f'printf("%zu\\n", offsetof({c_type}, {f}));')
            expected.append(ffi.offsetof(cffi_type, f))
    lines.append('printf("%zu\\n", offsetof(struct kvm_run, io));')
    expected.append(lib.KVM_RUN_EXIT_UNION_OFFSET)
    lines.append('printf("%lu\\n", (unsigned long)KVM_RUN);')
    expected.append(lib.KVM_RUN)
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == expected


def test_failing_ioctl_names_itself(kvm_device):
    kvm = Kvm()
    try:
        regs = ffi.new("struct kvm_regs *")
        with pytest.raises(KvmError) as info:
            ioctl(kvm.fd, lib.KVM_GET_REGS, regs)  # a vCPU ioctl on the system fd
        assert "KVM_GET_REGS" in str(info.value)
        assert info.value.errno != 0
    finally:
        kvm.close()


def test_missing_capability_is_a_clear_error(kvm_device):
    kvm = Kvm()
    try:
        kvm.require("KVM_CAP_USER_MEMORY")  # present everywhere
        with pytest.raises(UserError, match="lacks required capabilities: 987654"):
            kvm.require(987654)
    finally:
        kvm.close()


def test_exit_reason_names_cover_the_common_exits():
    for name in ("KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_INTERNAL_ERROR"):
        assert EXIT_REASON_NAMES[getattr(lib, name)] == name


def test_kvm_device_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Kvm(str(tmp_path / "nokvm"))
    with pytest.raises(UserError, match="cannot open"):
        Kvm(str(tmp_path))  # a directory
