"""Layer 3: the whole machine as data — captured from a paused Machine, and
applied to a fresh one.

Sections (container format in sections.py):

    META  JSON: kind (full/incremental), ids, the machine's shape (RAM, vCPUs,
          disks, taps), and what the host must provide (XSAVE size, MSRs,
          CPUID feature bits) — checked before anything is applied
    VMST  interrupt controllers, PIT, clock (kernel-ABI blobs)
    VCPU  one per vCPU: every register set, XSAVE, LAPIC, MSRs, events
    DEVS  JSON: each device's save_state()
    RAM   page lists + page data.  A full snapshot lists every non-zero page
          (pages not listed are zero); an incremental one, every page dirtied
          since its parent (guest writes from KVM's log and VMM writes).

Capture runs with the guest paused (Machine.pause: vCPUs parked, I/O thread
held), so no device request is half done.  Application order follows
PVM-NOTES: RAM, then PIT/clock/irqchip, then each vCPU, then devices.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

from kvmcolo import jsonsafe, sections, xsave
from kvmcolo.dirty_log import DirtyReader, RegionDirty, scatter_pages
from kvmcolo.kvm_ffi import Kvm, ffi, lib
from kvmcolo.memory import PAGE_SIZE
from kvmcolo.xsave import XsaveLayout

STATE_VERSION = 1
KNOWN_SECTIONS = {b"META": 1, b"VMST": 1, b"VCPU": 1, b"DEVS": 1, b"RAM ": 1}
KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"

# CPUID leaves whose feature bits a saved guest may depend on: the restoring
# host must offer every bit that was offered where the state was captured.
# (leaf, subleaf) -> the registers that hold feature bits (leaf 1 EBX, say,
# holds the APIC ID, and leaf 0xD EBX/ECX sizes, not features).
_FEATURE_REGS = {
    (1, 0): ("ecx", "edx"),
    (7, 0): ("ebx", "ecx", "edx"),
    (0xD, 0): ("eax", "edx"),  # XSAVE state components
    (0xD, 1): ("eax",),
    (0x4000_0001, 0): ("eax",),  # KVM's paravirtual features
    (0x80000001, 0): ("ecx", "edx"),
}
_FEATURE_LEAVES = tuple(_FEATURE_REGS)


class IncompatibleState(ValueError):
    """The state cannot be applied to this host or machine."""


# ---- host fingerprint ----------------------------------------------------------


@dataclass
class HostCaps:
    xsave_size: int
    msrs: list[int]
    cpuid: dict[str, list[int]]  # "leaf.subleaf" -> [eax, ebx, ecx, edx]
    xsave_layout: XsaveLayout = XsaveLayout(())  # this host's XSAVE components (for comparing by meaning)

    @classmethod
    def of(cls, machine) -> HostCaps:
        """This host's capabilities, with the CPU features the machine's CPU
        model gives its vCPUs (what a pair must agree on, and a restore needs)."""
        return cls.probe(machine.kvm, machine.vm.vcpus[0], machine.cpuid_table)

    @classmethod
    def probe(cls, kvm: Kvm, vcpu, cpuid_table: list | None = None) -> HostCaps:
        xsave_size = max(ffi.sizeof("struct kvm_xsave"), kvm.check_extension("KVM_CAP_XSAVE2"))
        msrs = vcpu.readable_msrs(kvm.msr_index_list())
        cpuid = {}
        supported = kvm.supported_cpuid()
        for e in supported if cpuid_table is None else cpuid_table:
            key = (e.function, e.index if e.flags & lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX else 0)
            if key in _FEATURE_LEAVES:
                cpuid[f"{key[0]:#x}.{key[1]}"] = [e.eax, e.ebx, e.ecx, e.edx]
        return cls(xsave_size, msrs, cpuid, XsaveLayout.from_cpuid(supported))

    def check_can_hold(self, saved: dict) -> None:
        if saved["xsave_size"] > self.xsave_size:
            raise IncompatibleState(f"saved XSAVE area is {saved['xsave_size']} bytes, this host's is {self.xsave_size}")
        missing = sorted(set(saved["msrs"]) - set(self.msrs))
        if missing:
            raise IncompatibleState(f"this host cannot restore MSRs {', '.join(hex(m) for m in missing)}")
        for leaf, regs in saved["cpuid"].items():
            here = self.cpuid.get(leaf, [0, 0, 0, 0])
            function, subleaf = leaf.split(".")
            checked = _FEATURE_REGS.get((int(function, 16), int(subleaf)), ())
            for name, a, b in zip(("eax", "ebx", "ecx", "edx"), regs, here):
                lacking = a & ~b if name in checked else 0
                if lacking:
                    raise IncompatibleState(f"this host's CPU lacks CPUID {leaf} {name} bits {lacking:#x} the guest was given")

    @staticmethod
    def feature_bits(cpuid: dict) -> dict:
        """Only the feature registers of a saved CPUID dict (others hold APIC
        IDs and sizes that differ from CPU to CPU)."""
        out = {}
        for leaf, regs in cpuid.items():
            function, subleaf = leaf.split(".")
            checked = _FEATURE_REGS.get((int(function, 16), int(subleaf)), ())
            out[leaf] = [r for name, r in zip(("eax", "ebx", "ecx", "edx"), regs) if name in checked]
        return out

    def as_meta(self) -> dict:
        return {"xsave_size": self.xsave_size, "msrs": self.msrs, "cpuid": self.cpuid}


# ---- blobs ----------------------------------------------------------------------------

_BLOB = struct.Struct("<HI")


def pack_blobs(blobs: dict[str, bytes]) -> bytes:
    out = bytearray()
    for name, data in blobs.items():
        raw = name.encode()
        out += _BLOB.pack(len(raw), len(data)) + raw + data
    return bytes(out)


def unpack_blobs(payload) -> dict[str, bytes]:
    view = memoryview(payload)
    out, at = {}, 0
    while at < len(view):
        if at + _BLOB.size > len(view):
            raise sections.StateFormatError("truncated blob header")
        nlen, dlen = _BLOB.unpack_from(view, at)
        at += _BLOB.size
        if at + nlen + dlen > len(view):
            raise sections.StateFormatError("truncated blob")
        try:
            name = bytes(view[at : at + nlen]).decode()
        except UnicodeDecodeError:
            raise sections.StateFormatError("a blob name is not UTF-8")
        out[name] = bytes(view[at + nlen : at + nlen + dlen])
        at += nlen + dlen
    return out


# ---- RAM --------------------------------------------------------------------------------

_RAM_HEADER = struct.Struct("<I")  # number of regions
_RAM_REGION = struct.Struct("<IQI")  # slot, region size, page count


def ram_section(dirty: list[RegionDirty], buffer: bytearray | None = None) -> sections.Section:
    """Page lists then page data, gathered into one buffer (copied while the
    guest is paused, so the section is a consistent picture)."""
    total = sum(d.count for d in dirty)
    head = bytearray(_RAM_HEADER.pack(len(dirty)))
    for d in dirty:
        head += _RAM_REGION.pack(d.region.slot, d.region.size, d.count)
        head += ffi.buffer(d.pages, 4 * d.count)
    need = len(head) + total * PAGE_SIZE
    buf = buffer if buffer is not None and len(buffer) >= need else bytearray(need)
    buf[: len(head)] = head
    at = len(head)
    for d in dirty:
        if d.count:
            d.gather(memoryview(buf)[at : at + d.count * PAGE_SIZE])
            at += d.count * PAGE_SIZE
    return sections.Section(b"RAM ", 1, memoryview(buf)[:need])


class RamPart(NamedTuple):
    """One memory region's pages in a RAM section."""

    slot: int
    size: int  # of the region
    pages: object  # cffi uint32_t[] page numbers
    count: int
    data: memoryview  # count pages, in page-number order


def parse_ram(payload) -> list[RamPart]:
    """The RAM section's parts, validated."""
    view = memoryview(payload)
    if len(view) < _RAM_HEADER.size:
        raise sections.StateFormatError("truncated RAM section")
    (nregions,) = _RAM_HEADER.unpack_from(view)
    at = _RAM_HEADER.size
    lists = []
    for _ in range(nregions):
        if at + _RAM_REGION.size > len(view):
            raise sections.StateFormatError("truncated RAM region header")
        slot, size, count = _RAM_REGION.unpack_from(view, at)
        at += _RAM_REGION.size
        if at + 4 * count > len(view):
            raise sections.StateFormatError("truncated RAM page list")
        pages = ffi.from_buffer("uint32_t[]", view[at : at + 4 * count])
        at += 4 * count
        npages = size // PAGE_SIZE
        if count and max(ffi.unpack(pages, count)) >= npages:
            raise sections.StateFormatError(f"RAM page number beyond slot {slot}")
        lists.append((slot, size, pages, count))
    out = []
    for slot, size, pages, count in lists:
        if at + count * PAGE_SIZE > len(view):
            raise sections.StateFormatError("truncated RAM pages")
        out.append(RamPart(slot, size, pages, count, view[at : at + count * PAGE_SIZE]))
        at += count * PAGE_SIZE
    return out


# ---- capture ----------------------------------------------------------------------------


@dataclass
class Captured:
    sections: list[sections.Section]
    meta: dict
    dirty_pages: int


def capture(machine, dirty: DirtyReader, kind: str, parent: str | None, host: HostCaps,
            ram_buffer: bytearray | None = None) -> Captured:  # fmt: skip
    """The machine's state (guest paused).  `kind` full: every non-zero page;
    incremental: pages dirtied since the last capture.  Either way the dirty
    log is re-armed, so the next incremental is relative to this one."""
    dirty = dirty.collect()
    if kind == KIND_FULL:
        dirty = nonzero_pages(dirty)
    meta = {
        "state_version": STATE_VERSION,
        "kind": kind,
        "id": uuid.uuid4().hex,
        "parent": parent,
        "time": time.time(),
        "machine": machine.shape(),
        "operator_stopped": machine.run_state.operator_stopped,  # a COLO secondary mirrors it
        "host": host.as_meta(),
    }
    secs = [sections.Section(b"META", 1, json.dumps(meta).encode())]
    secs.append(sections.Section(b"VMST", 1, pack_blobs(machine.vm.save_state())))
    for v in machine.vm.vcpus:
        secs.append(sections.Section(b"VCPU", 1, pack_blobs(v.save_state(host.msrs, host.xsave_size))))
    secs.append(sections.Section(b"DEVS", 1, json.dumps(machine.save_devices()).encode()))
    secs.append(ram_section(dirty, ram_buffer))
    return Captured(secs, meta, sum(d.count for d in dirty))


def nonzero_pages(dirty: list[RegionDirty]) -> list[RegionDirty]:
    """Each region's pages that are not all zero (a fresh machine's RAM is zero)."""
    out = []
    for d in dirty:
        r = d.region
        count = lib.kvmcolo_nonzero_pages(ffi.cast("uint8_t *", r.host_addr), r.npages, d.pages)
        out.append(RegionDirty(r, d.pages, count))
    return out


# ---- fingerprints, for checking that two machines hold the same state --------

# Pieces of state that move with time on their own even while the guest is
# paused: the TSC MSR, the LAPIC timer's current count and the interrupt
# request register it fills when it expires, the PIT's counters and load
# time, and the VM clock.
_TIME_DEPENDENT_MSRS = {0x10}
_PIC_PENDING = slice(8, 10)  # struct kvm_irqchip: chip_id, pad, then the PIC's last_irr and irr

# Guest memory the host's KVM writes on its own, on its own clock: kvmclock
# (per vCPU), the wall clock, steal time, the async-PF reason and the PV EOI
# flag.  Each is found from the MSR the guest registered it with: MSR ->
# (address mask, length).  Two hosts write different times there, so state
# hashes leave these bytes out; everything else in RAM must be equal.
_KVM_WRITTEN = {
    0x4B564D01: (~0x1, 32),  # MSR_KVM_SYSTEM_TIME_NEW: pvclock_vcpu_time_info
    0x12: (~0x1, 32),  # MSR_KVM_SYSTEM_TIME (old numbering)
    0x4B564D00: (~0x0, 12),  # MSR_KVM_WALL_CLOCK_NEW: pvclock_wall_clock
    0x11: (~0x0, 12),  # MSR_KVM_WALL_CLOCK
    0x4B564D03: (~0x3F, 64),  # MSR_KVM_STEAL_TIME
    0x4B564D02: (~0x3F, 64),  # MSR_KVM_ASYNC_PF_EN
    0x4B564D04: (~0x1, 4),  # MSR_KVM_PV_EOI_EN
}


def _kvm_written_areas(vcpu_states) -> set[tuple[int, int]]:
    """(guest address, length) of each area KVM writes, from each vCPU's MSRs."""
    areas = set()
    for state in vcpu_states:
        msrs = state["msrs"]
        for i in range(0, len(msrs), 16):  # struct kvm_msr_entry: index u32, reserved u32, data u64
            index = int.from_bytes(msrs[i : i + 4], "little")
            if index in _KVM_WRITTEN:
                data = int.from_bytes(msrs[i + 8 : i + 16], "little")
                mask, length = _KVM_WRITTEN[index]
                if data & mask:
                    areas.add((data & mask, length))
    return areas


def _hash_ram(region, leave_out: list[tuple[int, int]]) -> str:
    """The region's hash with the `leave_out` areas counted as zeros (hashed
    in pieces: no copy of the region)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    at = 0
    for gpa, length in leave_out:
        start, end = max(gpa - region.gpa, at), min(gpa + length - region.gpa, region.size)
        if end <= start:
            continue
        digest.update(region.view[at:start])
        digest.update(bytes(end - start))
        at = end
    digest.update(region.view[at:])
    return digest.hexdigest()
_LAPIC_TIMER_CURRENT_COUNT = 0x390
_LAPIC_IRR = range(0x200, 0x280)
# The processor priority is derived state (from the TPR and the highest
# in-service vector, both compared): KVM updates the stored register lazily
# and recomputes it on KVM_SET_LAPIC, so a capture taken before an update
# and the state loaded from it can hold different PPR bytes with the same
# meaning (CI saw "lapic.other" differ this way, twice in ~40 runs).
_LAPIC_PPR = slice(0xA0, 0xA4)
# Hashed apart so that a mismatch says where (the rest is "lapic.other").
_LAPIC_PARTS = {"isr": slice(0x100, 0x180), "tmr": slice(0x180, 0x200), "icr": slice(0x300, 0x320),
                "lvt": slice(0x320, 0x380), "timer": slice(0x380, 0x400), "tpr": slice(0x80, 0x84),
                "ldr-dfr": slice(0xD0, 0xE4), "svr": slice(0xF0, 0xF4), "esr": slice(0x280, 0x284)}  # fmt: skip


def state_hashes(machine, host: HostCaps, captured: Captured | None = None) -> dict[str, str]:
    """Hashes of every piece of state that does not move with time (guest
    paused): RAM per region, VM interrupt controllers, each vCPU piece.
    `captured`: hash the VM and vCPU state of that capture rather than read
    them again (a timer or an irqfd can change an interrupt controller
    between two reads of a held guest; what was sent is what counts)."""
    import hashlib

    def h(data) -> str:
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    out = {}
    if captured is not None:
        vm_state = unpack_blobs(next(c.payload for c in captured.sections if c.tag == b"VMST"))
        vcpu_states = [unpack_blobs(c.payload) for c in captured.sections if c.tag == b"VCPU"]
    else:
        vm_state = machine.vm.save_state()
        vcpu_states = [v.save_state(host.msrs, host.xsave_size) for v in machine.vm.vcpus]
    host_written = sorted(_kvm_written_areas(vcpu_states))
    for r in machine.vm.memory.regions:
        out[f"ram.{r.slot}"] = _hash_ram(r, host_written)
    for name in ("pic_master", "pic_slave", "ioapic"):
        chip = bytearray(vm_state[name])
        if name.startswith("pic"):
            chip[_PIC_PENDING] = bytes(len(chip[_PIC_PENDING]))  # like the LAPIC's IRR: timers fire on each host's time
        out[f"vm.{name}"] = h(chip)
    entry = ffi.sizeof("struct kvm_msr_entry")
    for index, state in enumerate(vcpu_states):
        state = dict(state)
        lapic = bytearray(state.pop("lapic"))
        lapic[_LAPIC_TIMER_CURRENT_COUNT : _LAPIC_TIMER_CURRENT_COUNT + 4] = bytes(4)
        lapic[_LAPIC_IRR.start : _LAPIC_IRR.stop] = bytes(len(_LAPIC_IRR))
        lapic[_LAPIC_PPR] = bytes(4)
        for part, where in _LAPIC_PARTS.items():  # a difference names its registers
            state[f"lapic.{part}"] = bytes(lapic[where])
            lapic[where] = bytes(len(lapic[where]))
        state["lapic.other"] = bytes(lapic)
        msrs = state.pop("msrs")
        kept = b"".join(msrs[i : i + entry] for i in range(0, len(msrs), entry)
                        if int.from_bytes(msrs[i : i + 4], "little") not in _TIME_DEPENDENT_MSRS)  # fmt: skip
        state["msrs"] = kept
        state["xsave"] = xsave.canonical(state["xsave"], host.xsave_layout)
        for name, blob in state.items():
            out[f"vcpu{index}.{name}"] = h(blob)
    out["devices"] = h(json.dumps(machine.save_devices(), sort_keys=True).encode())
    return out


# ---- reading and applying -------------------------------------------------------------


@dataclass
class Snapshot:
    meta: dict
    vm: dict[str, bytes]
    vcpus: list[dict[str, bytes]]
    devices: dict
    ram: list[RamPart]

    @property
    def pages(self) -> int:
        return sum(part.count for part in self.ram)


# What the code reading a state stream's META relies on (jsonsafe.check_shape).
_META_SHAPE = {
    "state_version": int, "kind": str, "id": str, "parent": (str, type(None)),
    "machine": {"mem_size": int, "cpus": int, "ioeventfd": bool,  # and "cpu" (str) since --cpu
                "disks": [{"path": str, "readonly": bool, "size": int}],
                "nets": [{"tap": str, "mac": str, "bridge": (str, type(None))}]},
    "host": {"xsave_size": int, "msrs": [int], "cpuid": {str: [int]}},
}  # fmt: skip


def parse(data) -> Snapshot:
    """Decode and check a whole state stream (nothing is applied here)."""
    secs = sections.decode(data, KNOWN_SECTIONS)
    by_tag: dict[bytes, list] = {}
    for s in secs:
        by_tag.setdefault(s.tag, []).append(s.payload)
    for tag in (b"META", b"VMST", b"DEVS", b"RAM "):
        if len(by_tag.get(tag, [])) != 1:
            raise sections.StateFormatError(f"state needs exactly one {tag.decode().strip()} section")
    try:
        meta = jsonsafe.loads(bytes(by_tag[b"META"][0]))
        devices = jsonsafe.loads(bytes(by_tag[b"DEVS"][0]))
        jsonsafe.check_shape(meta, {"state_version": int})
        if meta["state_version"] != STATE_VERSION:
            raise sections.StateFormatError(f"state version {meta['state_version']} is not supported")
        jsonsafe.check_shape(meta, _META_SHAPE)
        jsonsafe.check_shape(devices, {str: object}, "devices")
    except jsonsafe.JSONRefused as e:
        raise sections.StateFormatError(f"bad metadata: {e}")
    if meta["kind"] not in (KIND_FULL, KIND_INCREMENTAL) or meta["machine"]["cpus"] < 1:
        raise sections.StateFormatError(f"bad metadata: kind {meta['kind']!r}, {meta['machine']['cpus']} vCPUs")
    vcpus = [unpack_blobs(p) for p in by_tag.get(b"VCPU", [])]
    if len(vcpus) != meta["machine"]["cpus"]:
        raise sections.StateFormatError(f"{len(vcpus)} vCPU sections for {meta['machine']['cpus']} vCPUs")
    return Snapshot(meta, unpack_blobs(by_tag[b"VMST"][0]), vcpus, devices, parse_ram(by_tag[b"RAM "][0]))


def check_chain(snaps: list[Snapshot]) -> None:
    if not snaps or snaps[0].meta["kind"] != KIND_FULL:
        raise IncompatibleState("a restore starts from a full snapshot")
    for prev, cur in zip(snaps, snaps[1:]):
        if cur.meta["kind"] != KIND_INCREMENTAL or cur.meta["parent"] != prev.meta["id"]:
            raise IncompatibleState(f"snapshot {cur.meta['id'][:8]} does not follow {prev.meta['id'][:8]}")
        if cur.meta["machine"] != prev.meta["machine"]:
            raise IncompatibleState("snapshots of a chain describe different machines")


def apply_ram(memory, snap: Snapshot) -> None:
    """Write a snapshot's pages into `memory` (a machine's RAM, or the COLO
    secondary's RAM cache)."""
    apply_ram_parts(memory, snap.ram)


def apply_ram_parts(memory, parts: list[RamPart]) -> None:
    """Write parsed RAM-section parts into `memory`; every part is checked
    against the machine before any page is written."""
    regions = {r.slot: r for r in memory.regions}
    for part in parts:
        r = regions.get(part.slot)
        if r is None or r.size != part.size:
            raise IncompatibleState(f"memory slot {part.slot} does not match this machine")
    for part in parts:
        if part.count:
            scatter_pages(regions[part.slot], part.pages, part.count, part.data)


def apply(machine, snap: Snapshot) -> None:
    """Apply vCPU, VM and device state (RAM separately, chain first)."""
    machine.vm.load_state(snap.vm)
    for v, state in zip(machine.vm.vcpus, snap.vcpus):
        v.load_state(state)
    machine.load_devices(snap.devices)
