"""Layer 2: the CPUID table each vCPU is given.

Start from KVM_GET_SUPPORTED_CPUID and make it describe this machine: the
vCPU's APIC ID, the "running under a hypervisor" bit, and the KVM leaves at
0x40000000 with a timing leaf (0x40000010: TSC and LAPIC bus frequency in
kHz, the convention VMware introduced and others follow) so a guest can
time things without calibrating against a legacy timer.

(Under nested PVM, CPUID executed at CPL3 returns host values and ignores
this table; our tiny guests read it at CPL0 during boot.)
"""

from __future__ import annotations

from kvmcolo.kvm_ffi import ffi

HYPERVISOR_LEAF = 0x4000_0000
TIMING_LEAF = 0x4000_0010
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
LAPIC_BUS_KHZ = 1_000_000  # KVM's LAPIC timer counts at 1 GHz (1 ns bus cycle)
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28


def _entry(function: int, index: int = 0, eax=0, ebx=0, ecx=0, edx=0, flags=0):
    e = ffi.new("struct kvm_cpuid_entry2 *")
    e.function, e.index, e.flags = function, index, flags
    e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
    return e


def vcpu_cpuid(supported: list, apic_id: int, ncpus: int, tsc_khz: int) -> list:
    """The CPUID entries (struct pointers) for one vCPU; `supported` is not changed."""
    out = []
    for src in supported:
        e = ffi.new("struct kvm_cpuid_entry2 *", src[0])
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (min(ncpus, 255) << 16) | ((apic_id & 0xFF) << 24)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            if ncpus > 1:
                e.edx |= CPUID_1_EDX_HTT
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id  # x2APIC ID of this logical processor
        elif e.function >= HYPERVISOR_LEAF and e.function < HYPERVISOR_LEAF + 0x100:
            if e.function != HYPERVISOR_LEAF + 1:  # keep KVM's feature leaf, replace the rest
                continue
        out.append(e)
    sig = [int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8)]
    out.append(_entry(HYPERVISOR_LEAF, eax=TIMING_LEAF, ebx=sig[0], ecx=sig[1], edx=sig[2]))
    out.append(_entry(TIMING_LEAF, eax=tsc_khz, ebx=LAPIC_BUS_KHZ))
    return out
