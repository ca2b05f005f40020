"""The XSAVE area compared by meaning (kvmcolo.xsave): pure rules, then a
real vCPU's area, then a guest that keeps known x87/SSE/MXCSR values and
checks them across snapshot/restore (COLO: tests/test_colo.py)."""

from __future__ import annotations

import struct

import pytest

from kvmcolo import xsave
from kvmcolo.xsave import Component, XsaveLayout

# A host that describes AVX (component 2, 256 bytes at 576) and an opmask-like
# component 5 (64 bytes at 1088, 64-byte aligned when compacted).
LAYOUT = XsaveLayout((Component(2, 576, 256, False), Component(5, 1088, 64, True)))
SIZE = 4096


def area(xstate_bv: int, xmm: bytes = bytes(256), ymm: bytes = bytes(256), fcw: int = 0x037F,
         mxcsr: int = 0x1F80, xcomp_bv: int = 0) -> bytearray:  # fmt: skip
    a = bytearray(SIZE)
    struct.pack_into("<H", a, 0, fcw)
    struct.pack_into("<I", a, 24, mxcsr)
    struct.pack_into("<I", a, 28, 0xFFFF)
    a[160:416] = xmm
    a[576:832] = ymm
    struct.pack_into("<QQ", a, 512, xstate_bv, xcomp_bv)
    return a


def same(a, b) -> bool:
    return xsave.canonical(bytes(a), LAYOUT) == xsave.canonical(bytes(b), LAYOUT)


def test_component_in_init_state_equals_explicit_init_values():
    # The case seen on an AMD EPYC host: SSE stored with zero registers, then
    # reported in its init state after a round trip.
    assert same(area(0b11), area(0b01))
    assert same(area(0b111), area(0b000))


def test_bytes_of_a_cleared_component_are_ignored():
    garbage = bytes(range(256))
    assert same(area(0b000, xmm=garbage, ymm=garbage, fcw=0x1234), area(0b000))


def test_real_differences_are_seen():
    assert not same(area(0b10, xmm=b"\1" + bytes(255)), area(0b10))
    assert not same(area(0b110, ymm=bytes(255) + b"\1"), area(0b110))
    assert not same(area(0b01, fcw=0x0E7F), area(0b01))
    assert not same(area(0b00, mxcsr=0x7F80), area(0b00))  # MXCSR counts even with SSE in init state


def test_processor_properties_and_free_bytes_are_ignored():
    a, b = area(0b11), area(0b11)
    struct.pack_into("<I", b, 28, 0xFFBF)  # MXCSR_MASK
    b[500] = 7  # bytes 464-511 are free for software
    assert same(a, b)


def test_compacted_area_equals_the_standard_one():
    ymm = bytes(range(256))
    std = area(0b100111, ymm=ymm)
    std[1088:1152] = b"\x05" * 64
    comp = area(0b100111, xcomp_bv=(1 << 63) | 0b100111)
    comp[576:832] = ymm
    comp[832:896] = b"\x05" * 64  # component 5 follows component 2, 64-byte aligned (832 already is)
    assert same(std, comp)
    comp[832] = 6
    assert not same(std, comp)


def test_a_component_the_layout_does_not_know_is_still_compared():
    a, b = area(0b11 | 1 << 9), area(0b11 | 1 << 9)
    b[3000] = 1
    assert not same(a, b)


def test_layout_from_cpuid_tuples():
    layout = XsaveLayout.from_cpuid([(0xD, 0, 0x7, 0, 0), (0xD, 2, 256, 576, 0), (0xD, 5, 64, 1088, 2), (1, 0, 0, 0, 0)])
    assert layout == LAYOUT


def test_short_area_is_refused():
    with pytest.raises(ValueError):
        xsave.canonical(bytes(100), LAYOUT)


# ---- a real vCPU ------------------------------------------------------------


def test_real_vcpu_area_round_trips_by_meaning(kvm_device):
    from kvmcolo.machine import Machine, MachineConfig
    from kvmcolo import guest_images, vmstate

    m = Machine(MachineConfig(kernel=str(guest_images.build_dir() / "hello.elf")))
    try:
        host = vmstate.HostCaps.probe(m.kvm, m.vm.vcpus[0])
        assert host.xsave_layout.components, "KVM described no XSAVE component of this host"
        v = m.vm.vcpus[0]
        state = v.save_state(host.msrs, host.xsave_size)
        raw = bytearray(state["xsave"])
        xstate_bv = struct.unpack_from("<Q", raw, 512)[0]
        # The same state with every component spelled out as init values, or
        # with every init component's bit cleared, is the same state.
        cleared = bytearray(raw)
        struct.pack_into("<Q", cleared, 512, xstate_bv & ~0b10 if raw[160:416] == bytes(256) else xstate_bv)
        assert xsave.canonical(bytes(raw), host.xsave_layout) == xsave.canonical(bytes(cleared), host.xsave_layout)
        v.load_state({**state, "xsave": bytes(cleared)})
        again = v.save_state(host.msrs, host.xsave_size)["xsave"]
        assert xsave.canonical(again, host.xsave_layout) == xsave.canonical(bytes(raw), host.xsave_layout)
    finally:
        m.close()


# ---- the guest keeps its registers ------------------------------------------------


def test_fpregs_guest_keeps_registers_across_snapshot_restore(images, tmp_path):
    from test_snapshot import quit_vmm, restore, start_vmm

    a = start_vmm(tmp_path, "a", "run", "--image", "fpregs", "--", "report=200")
    a.wait_line(r"fpregs: pass=400 ok")
    files = [tmp_path / f"s{i}.snap" for i in range(3)]
    a.call("snapshot", path=str(files[0]))
    a.wait_line(r"fpregs: pass=\d+ ok", start=len(a.lines))
    a.call("snapshot", path=str(files[1]), incremental=True)
    a.wait_line(r"fpregs: pass=\d+ ok", start=len(a.lines))
    a.call("stop")
    a.call("snapshot", path=str(files[2]), incremental=True)
    before = a.call("query-state-hash")
    assert quit_vmm(a) == 0
    assert not any("FAIL" in line for line in a.lines)

    b = restore(tmp_path, "b", *files, paused=True)
    try:
        after = b.call("query-state-hash")
        assert after == before
        b.call("cont")
        start = len(b.lines)
        b.wait_line(r"fpregs: pass=\d+ ok", start=start)
        b.wait_line(r"fpregs: pass=\d+ ok", start=start + 1)
        assert not any("FAIL" in line or "fpregs: start" in line for line in b.lines), b.lines[-5:]
    finally:
        quit_vmm(b)
