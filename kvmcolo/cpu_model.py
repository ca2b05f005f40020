"""Layer 2: the CPU model — which CPUID features the guest is shown.

    host                      everything this host's KVM supports (the default)
    base                      a portable x86-64 CPU (below), the same on any host
    host,-pv-send-ipi,+x2apic  either, with features taken away or required

A feature is named once here (leaf, subleaf, register, bit), the same on
every vendor.  `-name` clears the bit; `+name` requires it, and a host that
cannot provide it is refused with one line, so a pair or a restore never
runs a model one side lacks.  The vendor string and family are the host's.

(The KVM paravirtual features matter most: a host may advertise one it
serves badly — nested PVM stalls SMP guests on pv-send-ipi — and a pair of
hosts must show the guest the same ones.)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmcolo.errors import UserError

KVM_FEATURES = 0x4000_0001

# name -> (leaf, subleaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {
    **{name: (KVM_FEATURES, 0, "eax", bit) for name, bit in (
        ("kvmclock", 0), ("nop-io-delay", 1), ("kvmclock2", 3), ("async-pf", 4), ("steal-time", 5),
        ("pv-eoi", 6), ("pv-unhalt", 7), ("pv-tlb-flush", 9), ("async-pf-vmexit", 10), ("pv-send-ipi", 11),
        ("poll-control", 12), ("pv-sched-yield", 13), ("async-pf-int", 14), ("msi-ext-dest-id", 15))},
    **{name: (1, 0, "ecx", bit) for name, bit in (
        ("sse3", 0), ("pclmulqdq", 1), ("ssse3", 9), ("fma", 12), ("cx16", 13), ("pcid", 17), ("sse4.1", 19),
        ("sse4.2", 20), ("x2apic", 21), ("movbe", 22), ("popcnt", 23), ("tsc-deadline", 24), ("aes", 25),
        ("xsave", 26), ("avx", 28), ("f16c", 29), ("rdrand", 30))},
    **{name: (1, 0, "edx", bit) for name, bit in (("mce", 7), ("mca", 14), ("pat", 16), ("pse36", 17), ("clflush", 19))},
    **{name: (7, 0, "ebx", bit) for name, bit in (
        ("fsgsbase", 0), ("bmi1", 3), ("avx2", 5), ("smep", 7), ("bmi2", 8), ("erms", 9), ("invpcid", 10),
        ("avx512f", 16), ("rdseed", 18), ("adx", 19), ("smap", 20), ("clflushopt", 23), ("clwb", 24), ("sha", 29))},
    **{name: (7, 0, "ecx", bit) for name, bit in (
        ("umip", 2), ("pku", 3), ("vaes", 9), ("vpclmulqdq", 10), ("rdpid", 22))},
    **{name: (7, 0, "edx", bit) for name, bit in (("md-clear", 10), ("spec-ctrl", 26), ("ssbd", 31))},
    **{name: (0x8000_0001, 0, "edx", bit) for name, bit in (("rdtscp", 27), ("pdpe1gb", 26))},
    **{name: (0x8000_0001, 0, "ecx", bit) for name, bit in (("lahf-lm", 0), ("abm", 5))},
}  # fmt: skip
MODELS = ("host", "base")

# The base model: the x86-64 baseline every 64-bit CPU has (leaf 1's EDX:
# up to SSE2; syscall, NX and long mode) with CMPXCHG16B and LAHF in long
# mode, the APIC features KVM emulates on any host (x2APIC, TSC deadline),
# and the KVM PV features that need nothing of the host (kvmclock, steal
# time, PV EOI).  Everything else in the feature leaves is hidden: no SSE3
# and later, no XSAVE/AVX, nothing of leaf 7, no RDTSCP or 1 GiB pages.  Not
# x86-64-v2, deliberately: KVM need not offer SSE3-4.2 (nested PVM offers
# none of them), and a model some hosts cannot run is not portable.  A pair
# of different CPUs running `base` shows its guest the same CPU on both.
BASE_FEATURES = frozenset({
    "cx16", "x2apic", "tsc-deadline", "lahf-lm", "kvmclock", "nop-io-delay", "kvmclock2", "steal-time", "pv-eoi"})  # fmt: skip
_LONG_MODE_EDX = (1 << 11) | (1 << 20) | (1 << 29) | 0x0183_F3FF  # syscall, nx, lm, and leaf 1's mirrored bits
# (leaf, subleaf, register) -> the bits base keeps besides its named features
_BASE_KEEP: dict[tuple[int, int, str], int] = {
    (1, 0, "ecx"): 1 << 31,  # the hypervisor bit
    (7, 0, "ebx"): 0, (7, 0, "ecx"): 0, (7, 0, "edx"): 0, (7, 1, "eax"): 0,
    (0x8000_0001, 0, "ecx"): 0, (0x8000_0001, 0, "edx"): _LONG_MODE_EDX,
    (KVM_FEATURES, 0, "eax"): 1 << 24,  # kvmclock's stable bit
}  # fmt: skip


@dataclass(frozen=True)
class CpuModel:
    base: str = "host"
    add: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, spec: str) -> CpuModel:
        """`host[,+feat|-feat]...`; UserError naming what is wrong."""
        base, *changes = [p.strip() for p in spec.split(",")]
        if base not in MODELS:
            raise UserError(f"--cpu: unknown model {base!r} (known: {', '.join(MODELS)})")
        add, remove = set(), set()
        for change in changes:
            sign, name = change[:1], change[1:]
            if sign not in ("+", "-") or name not in FEATURES:
                raise UserError(f"--cpu: {change!r} is not +FEATURE or -FEATURE (features: {', '.join(sorted(FEATURES))})")
            (add if sign == "+" else remove).add(name)
            (remove if sign == "+" else add).discard(name)  # the last word on a feature wins
        return cls(base, frozenset(add), frozenset(remove))

    def __str__(self) -> str:
        return ",".join([self.base, *sorted(f"+{n}" for n in self.add), *sorted(f"-{n}" for n in self.remove)])

    def apply(self, entries: list) -> None:
        """Change a CPUID table (kvm_cpuid_entry2 pointers) in place; UserError
        if a required feature is not in it."""
        by_leaf = {(e.function, e.index): e for e in entries}
        missing = _missing(by_leaf, self.add)  # required of the host, whatever the model hides
        if missing:
            raise UserError(f"--cpu: this host cannot provide +{missing[0]}")
        if self.base == "base":
            missing = _missing(by_leaf, BASE_FEATURES)
            if missing:
                raise UserError(f"--cpu base: this host lacks {missing[0]}, which the base model has")
            keep = dict(_BASE_KEEP)
            for name in BASE_FEATURES | self.add:  # the base model, and what was added on top of it
                leaf, sub, reg, bit = FEATURES[name]
                keep[(leaf, sub, reg)] = keep.get((leaf, sub, reg), 0) | 1 << bit
            for (leaf, sub, reg), mask in keep.items():
                if (e := by_leaf.get((leaf, sub))) is not None:
                    setattr(e, reg, getattr(e, reg) & mask)
        for name in self.remove:
            leaf, sub, reg, bit = FEATURES[name]
            if (e := by_leaf.get((leaf, sub))) is not None:
                setattr(e, reg, getattr(e, reg) & ~(1 << bit))


def _missing(by_leaf: dict, names) -> list[str]:
    """The named features the table does not have, sorted."""
    out = []
    for name in sorted(names):
        leaf, sub, reg, bit = FEATURES[name]
        e = by_leaf.get((leaf, sub))
        if e is None or not getattr(e, reg) >> bit & 1:
            out.append(name)
    return out
