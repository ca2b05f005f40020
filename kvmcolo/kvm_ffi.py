"""Layer 1: the KVM bindings.

`ffi` and `lib` come from the cffi API-mode module compiled at install time
against <linux/kvm.h> (see _kvm_build.py).  This module adds the one ioctl
helper everything else uses, errors that name the ioctl, and the capability
checks the VMM relies on.
"""

from __future__ import annotations

import errno
import os

from kvmcolo._kvm import ffi, lib  # noqa: F401  (re-exported)
from kvmcolo._kvm_build import EXIT_REASONS, IOCTLS
from kvmcolo.errors import UserError

# ioctl number -> name, for error messages.
_IOCTL_NAMES = {getattr(lib, name): name for name in IOCTLS}

# exit reason number -> name, for reports of unexpected exits.
EXIT_REASON_NAMES = {getattr(lib, name): name for name in EXIT_REASONS}


class KvmError(OSError):
    """A KVM ioctl failed.  The message names the ioctl and the errno."""

    def __init__(self, request: int, err: int, what: str = ""):
        self.request = request
        self.ioctl_name = _IOCTL_NAMES.get(request, hex(request))
        detail = f" ({what})" if what else ""
        super().__init__(
            err, f"{self.ioctl_name}{detail} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
        )


def ioctl(fd: int, request: int, arg=None, what: str = "") -> int:
    """Issue one ioctl.  `arg` is a cffi pointer, an int, or None.

    Returns the ioctl's non-negative result; raises KvmError otherwise.
    EINTR is returned as an error too: the only ioctl that is interrupted on
    purpose is KVM_RUN, and the vCPU loop calls run_vcpu() for that.
    """
    if arg is None:
        r = lib.kvmcolo_ioctl_int(fd, request, 0)
    elif isinstance(arg, int):
        r = lib.kvmcolo_ioctl_int(fd, request, arg)
    else:
        r = lib.kvmcolo_ioctl(fd, request, arg)
    if r < 0:
        raise KvmError(request, -r, what)
    return r


def run_vcpu(fd: int) -> int:
    """KVM_RUN: returns 0 or -errno (EINTR and EAGAIN are normal outcomes)."""
    return lib.kvmcolo_ioctl_int(fd, lib.KVM_RUN, 0)


# Capabilities without which the VMM cannot work, with what each is for.
REQUIRED_CAPS = {
    "KVM_CAP_USER_MEMORY": "guest RAM from userspace memory",
    "KVM_CAP_IRQCHIP": "in-kernel LAPIC/IOAPIC/PIC",
    "KVM_CAP_PIT2": "in-kernel PIT",
    "KVM_CAP_HLT": "HLT handled in the kernel",
    "KVM_CAP_EXT_CPUID": "KVM_SET_CPUID2",
    "KVM_CAP_IMMEDIATE_EXIT": "pausing vCPUs without losing exits",
    "KVM_CAP_MP_STATE": "starting and saving vCPU run states",
}


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str | None = None):
        # KVMCOLO_KVM_DEVICE: another device node (containers, tests of the error paths)
        path = path or os.environ.get("KVMCOLO_KVM_DEVICE", "/dev/kvm")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UserError(f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd or enable virtualization)")
        except PermissionError:
            raise UserError(f"no permission to open {path}: run as root or join the 'kvm' group")
        except OSError as e:
            raise UserError(f"cannot open {path}: {e.strerror}")
        version = ioctl(self.fd, lib.KVM_GET_API_VERSION)
        if version != lib.KVM_API_VERSION:
            raise UserError(f"{path} speaks KVM API {version}, kvmcolo needs {lib.KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE)
        self.require(*REQUIRED_CAPS)

    def check_extension(self, cap: int | str) -> int:
        if isinstance(cap, str):
            cap = getattr(lib, cap)
        return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap)

    def require(self, *caps: str | int) -> None:
        missing = [c for c in caps if self.check_extension(c) <= 0]
        if missing:
            what = ", ".join(f"{c} ({REQUIRED_CAPS.get(c, 'required')})" for c in missing)
            raise UserError(f"this KVM lacks required capabilities: {what}")

    def max_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_MAX_VCPUS") or self.check_extension("KVM_CAP_NR_VCPUS") or 4

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits."""
        nent = 64
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            r = lib.kvmcolo_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if r == -errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            if r < 0:
                raise KvmError(lib.KVM_GET_SUPPORTED_CPUID, -r)
            # Copies, so the entries outlive `buf`.
            return [ffi.new("struct kvm_cpuid_entry2 *", buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM should save and restore."""
        n = 64
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            r = lib.kvmcolo_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
            if r == -errno.E2BIG:
                n = buf.nmsrs
                continue
            if r < 0:
                raise KvmError(lib.KVM_GET_MSR_INDEX_LIST, -r)
            return [buf.indices[i] for i in range(buf.nmsrs)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
