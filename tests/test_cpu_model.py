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
