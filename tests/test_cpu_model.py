"""The CPU model (--cpu): parsing, and what it does to a real CPUID table."""

from __future__ import annotations

import pytest

from conftest import kvmcolo_cmd
from kvmcolo.cpu_model import FEATURES, CpuModel
from kvmcolo.errors import UserError


def test_parse_and_print():
    m = CpuModel.parse("host,-pv-send-ipi,+x2apic,-pv-unhalt")
    assert m.add == {"x2apic"} and m.remove == {"pv-send-ipi", "pv-unhalt"}
    assert CpuModel.parse(str(m)) == m
    assert CpuModel.parse("host,+avx,-avx").remove == {"avx"} and not CpuModel.parse("host,+avx,-avx").add
    for bad in ("pentium", "host,avx", "host,-no-such-feature", "host,"):
        with pytest.raises(UserError):
            CpuModel.parse(bad)


def test_apply_to_this_hosts_table(kvm_device):
    from kvmcolo.cpuid import vcpu_cpuid
    from kvmcolo.kvm_ffi import Kvm

    kvm = Kvm()
    table = vcpu_cpuid(kvm.supported_cpuid(), 0, 1, 1_000_000)
    leaf, sub, reg, bit = FEATURES["pv-send-ipi"]
    (kvm_leaf,) = [e for e in table if (e.function, e.index) == (leaf, sub)]
    others = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in table if e is not kvm_leaf}
    CpuModel.parse("host,-pv-send-ipi").apply(table)
    assert not getattr(kvm_leaf, reg) >> bit & 1  # cleared, whatever the host had
    assert others == {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in table if e is not kvm_leaf}
    with pytest.raises(UserError, match=r"cannot provide \+pv-send-ipi"):
        CpuModel.parse("host,+pv-send-ipi").apply(table)  # the table now lacks it: refused, not faked


def test_a_bad_cpu_model_is_one_line_and_exit_2(images):
    proc = kvmcolo_cmd("run", "--image", "hello", "--cpu", "host,+warp-drive", timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "warp-drive" in proc.stderr


def _features(table) -> set[str]:
    by_leaf = {(e.function, e.index): e for e in table}
    return {name for name, (leaf, sub, reg, bit) in FEATURES.items()
            if (leaf, sub) in by_leaf and getattr(by_leaf[(leaf, sub)], reg) >> bit & 1}  # fmt: skip


def test_base_model_shows_the_same_cpu_on_any_host_that_has_it(kvm_device):
    """base on this host's real table shows exactly the base features among
    the named ones and nothing of leaf 7; a host without one is refused."""
    from kvmcolo.cpu_model import BASE_FEATURES
    from kvmcolo.cpuid import vcpu_cpuid
    from kvmcolo.kvm_ffi import Kvm

    kvm = Kvm()
    table = vcpu_cpuid(kvm.supported_cpuid(), 0, 1, 1_000_000)
    host = _features(table)
    if not BASE_FEATURES <= host:
        with pytest.raises(UserError, match="--cpu base: this host lacks"):
            CpuModel.parse("base").apply(table)
        return
    CpuModel.parse("base").apply(table)
    leaf1_edx = {n for n in host if FEATURES[n][:3] == (1, 0, "edx")}  # kept whole: every x86-64 CPU has them
    assert _features(table) == set(BASE_FEATURES) | leaf1_edx
    leaf7 = [e for e in table if e.function == 7]
    assert all(e.ebx == e.ecx == e.edx == 0 for e in leaf7 if e.index == 0)
    (leaf1,) = [e for e in table if (e.function, e.index) == (1, 0)]
    assert leaf1.ecx >> 31 & 1  # still says "hypervisor"
    extra = vcpu_cpuid(kvm.supported_cpuid(), 0, 1, 1_000_000)
    if "avx" in host:  # +feature on base: required of the host, and shown
        CpuModel.parse("base,+avx").apply(extra)
        assert _features(extra) == set(BASE_FEATURES) | leaf1_edx | {"avx"}
    else:
        with pytest.raises(UserError, match=r"cannot provide \+avx"):
            CpuModel.parse("base,+avx").apply(extra)


def test_a_guest_runs_on_the_base_model(images):
    proc = kvmcolo_cmd("run", "--image", "hello", "--cpus", "2", "--cpu", "base", "--", "status=0", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hello: cpus=2" in proc.stdout
