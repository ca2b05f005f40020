"""Layer 2: the XSAVE area compared by what the guest can see.

Snapshots and checkpoints keep the raw area KVM gives (KVM_GET_XSAVE/2 is
kernel ABI, and KVM_SET_XSAVE restores it exactly).  But two raw areas of
the same guest-visible state can differ: a processor may report a component
that holds its initial values as "in its init state" (its XSTATE_BV bit
clear, the bytes then meaningless) — the init optimisation of XSAVEOPT, and
seen on an AMD EPYC host after a plain save/restore round trip, where the
SSE bit came back clear.  Which processor does this, and when, differs from
host to host, so equality checks never compare the raw bytes.

`canonical()` maps an area to a form where equal guest state gives equal
bytes: every component whose XSTATE_BV bit is clear is replaced by its init
value, the header (XSTATE_BV, XCOMP_BV) and the bytes software may use
freely are dropped, and a compacted area (XCOMP_BV bit 63) is laid out in
the standard form.  Component offsets and sizes come from CPUID leaf 0xD as
this host reports it (never assumed): nothing here depends on a vendor, a
feature set or an XCR0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

LEGACY_SIZE = 512
HEADER_SIZE = 64
EXTENDED_START = LEGACY_SIZE + HEADER_SIZE
_COMPACTED = 1 << 63
_XSAVE_LEAF = 0xD

# Legacy (FXSAVE) region: x87 is component 0, SSE component 1.
_FCW = slice(0, 2)
_X87_REST = slice(2, 24)  # FSW, abridged FTW, FOP, FIP, FDP: all zero at init
_MXCSR_MASK = slice(28, 32)  # a property of the processor, not state: never restored
_ST_REGS = slice(32, 160)
_XMM_REGS = slice(160, 416)
_UNUSED = slice(416, 512)  # reserved, then free for software use
_FCW_INIT = struct.pack("<H", 0x037F)
# MXCSR (24..28) is loaded by XRSTOR whenever SSE or AVX is requested,
# whatever XSTATE_BV says, so it is compared as stored.


@dataclass(frozen=True)
class Component:
    index: int
    offset: int  # in the standard format
    size: int
    aligned: bool  # starts on a 64-byte boundary in the compacted format


@dataclass(frozen=True)
class XsaveLayout:
    components: tuple[Component, ...]  # the extended components (index >= 2) this host describes

    @classmethod
    def from_cpuid(cls, entries) -> XsaveLayout:
        """From KVM_GET_SUPPORTED_CPUID entries (objects with function,
        index, eax, ebx, ecx) or (function, index, eax, ebx, ecx) tuples."""
        found = []
        for e in entries:
            function, index, eax, ebx, ecx = (e if isinstance(e, tuple) else
                                              (e.function, e.index, e.eax, e.ebx, e.ecx))  # fmt: skip
            if function == _XSAVE_LEAF and 2 <= index < 63 and eax:
                found.append(Component(index, ebx, eax, bool(ecx & 2)))
        return cls(tuple(sorted(found, key=lambda c: c.index)))

    def known_mask(self) -> int:
        return sum(1 << c.index for c in self.components)


def canonical(area: bytes, layout: XsaveLayout) -> bytes:
    """`area` in a form that is equal exactly when the guest-visible state is."""
    if len(area) < EXTENDED_START:
        raise ValueError(f"an XSAVE area is at least {EXTENDED_START} bytes, got {len(area)}")
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", area, LEGACY_SIZE)
    legacy = bytearray(area[:LEGACY_SIZE])
    if not xstate_bv & 1:
        legacy[_FCW] = _FCW_INIT
        legacy[_X87_REST] = bytes(_X87_REST.stop - _X87_REST.start)
        legacy[_ST_REGS] = bytes(_ST_REGS.stop - _ST_REGS.start)
    if not xstate_bv & 2:
        legacy[_XMM_REGS] = bytes(_XMM_REGS.stop - _XMM_REGS.start)
    legacy[_MXCSR_MASK] = bytes(4)
    legacy[_UNUSED] = bytes(_UNUSED.stop - _UNUSED.start)
    out = [bytes(legacy)]

    compacted = bool(xcomp_bv & _COMPACTED)
    next_compacted = EXTENDED_START
    for c in layout.components:
        if compacted:
            if not xcomp_bv & (1 << c.index):
                offset = None  # not in this area at all: its state is the init state
            else:
                if c.aligned:
                    next_compacted = (next_compacted + 63) & ~63
                offset, next_compacted = next_compacted, next_compacted + c.size
        else:
            offset = c.offset
        # Every extended component this host describes has all-zero init values.
        if offset is None or not xstate_bv & (1 << c.index) or offset + c.size > len(area):
            out.append(bytes(c.size))
        else:
            out.append(bytes(area[offset : offset + c.size]))
    unknown = xstate_bv & ~layout.known_mask() & ~3 & ~_COMPACTED
    if unknown:
        # A component this host does not describe: compare the bit itself and
        # everything past the header, rather than silently ignore it.
        out.append(struct.pack("<Q", unknown))
        out.append(bytes(area[EXTENDED_START:]))
    return b"".join(out)
