"""Layer 2: the VM — its fd, in-kernel irqchip and PIT, memory, I/O buses and vCPUs.

The VM owns its vCPUs and decides when the machine ends: the first
request_exit() or vcpu_failed() wins, every vCPU is stopped, and wait()
returns a VmExit saying why.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from kvmcolo.errors import UserError
from kvmcolo.iobus import IoBus
from kvmcolo.kvm_ffi import Kvm, ffi, ioctl, lib
from kvmcolo.memory import GuestMemory
from kvmcolo.vcpu import PAUSE_TIMEOUT_S, Vcpu

log = logging.getLogger(__name__)

# KVM on Intel needs three pages for the real-mode TSS and one for the
# identity-mapped page table; both must sit in guest-physical space that is
# not RAM.  Put them just below the BIOS area at the top of the 32-bit hole.
IDENTITY_MAP_GPA = 0xFFFB_C000
TSS_GPA = 0xFFFB_D000

MAX_VCPUS = 255  # xAPIC IDs and the MADT's 8-bit processor IDs
VCPU_FAILURE_STATUS = 1  # process exit status when a vCPU fails (unexpected exit)


@dataclass(frozen=True)
class VmExit:
    status: int  # what the VMM process should exit with
    reason: str
    failed: bool = False  # True: the VM ended on an error, not by the guest's choice


class Vm:
    def __init__(self, kvm: Kvm, mem_size: int, ncpus: int):
        limit = min(kvm.max_vcpus(), MAX_VCPUS)
        if not 1 <= ncpus <= limit:
            raise UserError(f"--cpus must be between 1 and {limit} on this host, got {ncpus}")
        host_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if mem_size > host_ram:
            raise UserError(f"--mem {mem_size >> 20} MiB is more than this host's {host_ram >> 20} MiB of RAM")
        self.kvm = kvm
        self.fd = ioctl(kvm.fd, lib.KVM_CREATE_VM, 0)
        identity_map = ffi.new("uint64_t *", IDENTITY_MAP_GPA)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, identity_map)
        ioctl(self.fd, lib.KVM_SET_TSS_ADDR, TSS_GPA)
        ioctl(self.fd, lib.KVM_CREATE_IRQCHIP)
        ioctl(self.fd, lib.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *"))
        self.memory = GuestMemory(mem_size)
        self.memory.register(self.fd)
        self.pio_bus = IoBus("port")
        self.mmio_bus = IoBus("MMIO")
        self._irq_level = ffi.new("struct kvm_irq_level *")
        self._irq_lock = threading.Lock()
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._exited = threading.Event()
        self.vcpus = [Vcpu(self.fd, i, kvm.vcpu_mmap_size, self) for i in range(ncpus)]
        self._started = False
        self._closed = False

    # ---- interrupts ------------------------------------------------------

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive a GSI (PIC + IOAPIC input) high or low."""
        with self._irq_lock:
            self._irq_level.irq = irq
            self._irq_level.level = 1 if level else 0
            ioctl(self.fd, lib.KVM_IRQ_LINE, self._irq_level, what=f"irq {irq}")

    def add_ioeventfd(self, addr: int, length: int, datamatch: int, fd: int) -> None:
        """Have KVM signal `fd` for a guest MMIO write of `datamatch` at `addr`,
        in the kernel, without a userspace exit."""
        req = ffi.new("struct kvm_ioeventfd *")
        req.addr, req.len, req.fd = addr, length, fd
        req.datamatch, req.flags = datamatch, lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioctl(self.fd, lib.KVM_IOEVENTFD, req, what=f"{addr:#x}={datamatch}")

    # ---- life cycle --------------------------------------------------------

    def start(self) -> None:
        self._started = True
        for v in self.vcpus:
            v.start()

    def request_exit(self, status: int, reason: str) -> None:
        self._finish(VmExit(status, reason))

    def vcpu_failed(self, index: int, message: str) -> None:
        self._finish(VmExit(VCPU_FAILURE_STATUS, message, failed=True))

    def _finish(self, result: VmExit) -> None:
        with self._exit_lock:
            if self._exit is not None:
                return
            self._exit = result
        # Stop the others; never join the calling vCPU thread from itself.
        for v in self.vcpus:
            v.request_stop()
        self._exited.set()

    def wait(self, timeout: float | None = None) -> VmExit | None:
        """Wait for the VM to end; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exited.is_set():
            left = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
            if left <= 0:
                return None
            self._exited.wait(left)
        return self._exit

    @property
    def exit(self) -> VmExit | None:
        return self._exit

    # ---- pausing all vCPUs (the checkpoint engine's stop/go) -------------

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Park every vCPU.  Kicks all first, then waits, so the cost is one
        kick latency, not one per vCPU."""
        for v in self.vcpus:
            v.request_pause()
        for v in self.vcpus:
            v.wait_paused(timeout)

    def resume(self) -> None:
        for v in self.vcpus:
            v.resume()

    # ---- VM-wide state: interrupt controllers, PIT, clock ------------------

    _IRQCHIPS = (("pic_master", "KVM_IRQCHIP_PIC_MASTER"), ("pic_slave", "KVM_IRQCHIP_PIC_SLAVE"),
                 ("ioapic", "KVM_IRQCHIP_IOAPIC"))  # fmt: skip

    def save_state(self) -> dict[str, bytes]:
        """irqchip (PICs + IOAPIC), PIT and kvmclock as raw kernel-ABI bytes."""
        state = {}
        for name, chip in self._IRQCHIPS:
            buf = ffi.new("struct kvm_irqchip *")
            buf.chip_id = getattr(lib, chip)
            ioctl(self.fd, lib.KVM_GET_IRQCHIP, buf, what=name)
            state[name] = bytes(ffi.buffer(buf))
        for name, get, ctype in (("pit", lib.KVM_GET_PIT2, "struct kvm_pit_state2"),
                                 ("clock", lib.KVM_GET_CLOCK, "struct kvm_clock_data")):  # fmt: skip
            buf = ffi.new(ctype + " *")
            ioctl(self.fd, get, buf, what=name)
            state[name] = bytes(ffi.buffer(buf))
        return state

    def load_state(self, state: dict[str, bytes]) -> None:
        """Apply save_state() output: PIT, clock, then the interrupt controllers."""
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(pit, state["pit"], ffi.sizeof(pit[0]))
        ioctl(self.fd, lib.KVM_SET_PIT2, pit, what="pit")
        clock = ffi.new("struct kvm_clock_data *")
        ffi.memmove(clock, state["clock"], ffi.sizeof(clock[0]))
        clock.flags = 0  # only the clock value is set; KVM rejects the GET-only flags
        ioctl(self.fd, lib.KVM_SET_CLOCK, clock, what="clock")
        for name, _ in self._IRQCHIPS:
            chip = ffi.new("struct kvm_irqchip *")
            ffi.memmove(chip, state[name], ffi.sizeof(chip[0]))
            ioctl(self.fd, lib.KVM_SET_IRQCHIP, chip, what=name)

    # ---- teardown ----------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for v in self.vcpus:
            v.stop()
        for v in self.vcpus:
            v.close()
        os.close(self.fd)
        self.memory.close()
